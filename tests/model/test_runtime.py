import pytest

from pipeline.model.runtime import ProviderChoice, create_session, cuda_device_count


@pytest.mark.skipif(cuda_device_count() > 0, reason="checks the CPU-only path")
def test_cpu_machine_runs_on_cpu_and_refuses_forced_cuda(demo_bundle):
    session, info = create_session(demo_bundle / "model.onnx", ProviderChoice.AUTO, intra_op_threads=2)
    assert info.provider == "CPUExecutionProvider" and info.intra_op_threads == 2
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="no working CUDA device"):
        create_session(demo_bundle / "model.onnx", ProviderChoice.CUDA)


def test_tagger_stage_gives_the_same_rows_from_concurrent_calls(demo_bundle, demo_corpus):
    """GPU actors run batches_in_flight calls at once on one stage (graph.py): the
    stage must be safe to call from several threads."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from pipeline.image.decode import DecodeStage
    from pipeline.model.tagger import TaggerSettings, TaggerStage

    stage = TaggerStage(TaggerSettings(str(demo_bundle), provider=ProviderChoice.CPU, intra_op_threads=1))
    uris = sorted(str(p) for p in (demo_corpus / "images").rglob("*") if p.is_file())
    decoded = DecodeStage(stage.bundle.profile.preprocess)({"uri": np.array(uris, object)})
    batches = [{k: v[i : i + 8] for k, v in decoded.items()} for i in range(0, len(uris), 8)]

    def rows(table):
        return table.drop_columns(["tagged_at"]).to_pylist()

    serial = [rows(stage(b)) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert [rows(t) for t in pool.map(stage, batches)] == serial
    assert sum(r["error"] is not None for batch in serial for r in batch) == 4 and len(serial) > 4
