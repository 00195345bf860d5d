import pytest

from pipeline.runtime import ProviderChoice, create_session, cuda_device_count


@pytest.mark.skipif(cuda_device_count() > 0, reason="checks the CPU-only path")
def test_cpu_machine_runs_on_cpu_and_refuses_forced_cuda(demo_bundle):
    session, info = create_session(demo_bundle / "model.onnx", ProviderChoice.AUTO, intra_op_threads=2)
    assert info.provider == "CPUExecutionProvider" and info.intra_op_threads == 2
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="no working CUDA device"):
        create_session(demo_bundle / "model.onnx", ProviderChoice.CUDA)
