"""Deployment files: every manifest validates against its schema (KubeRay CRDs vendored
in tests/data/kuberay, core kinds from kubernetes-validate, the cluster launcher
against Ray's own schema), resources agree with the pipeline's settings, and entrypoints
name real files that the image ships."""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipeline.job.settings import load_nightly_config

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "infra" / "kuberay"
CRDS = ROOT / "tests" / "data" / "kuberay"  # gzip-compressed, source and hashes in its README
K8S_VERSION = "1.33.0"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml.gz",
    "RayJob": "ray.io_rayjobs.yaml.gz",
    "RayCronJob": "ray.io_raycronjobs.yaml.gz",
}


def strict(schema):
    """An openAPIV3 schema that also refuses unknown fields, as the API server does
    with strict field validation: objects listing their properties allow no others."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def crd_validator(kind: str):
    text = gzip.decompress((CRDS / CRD_FILES[kind]).read_bytes()).decode("utf-8")
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def documents():
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def validate(doc) -> list[str]:
    if doc["kind"] in CRD_FILES:
        assert doc["apiVersion"] == "ray.io/v1"
        return [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(doc["kind"]).iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc)]
    return []


def by_kind(kind: str) -> dict:
    found = [doc for _, doc in documents() if doc["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def test_every_manifest_validates_against_its_schema():
    kinds = []
    for name, doc in documents():
        assert validate(doc) == [], name
        kinds.append(doc["kind"])
    assert sorted(kinds) == [
        "ConfigMap",
        "PersistentVolumeClaim",
        "RayCluster",
        "RayCronJob",
        "RayJob",
        "Secret",
        "ServiceAccount",
    ]


def test_validation_catches_misspelled_fields_and_wrong_types():
    cluster = by_kind("RayCluster")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = typo["spec"]["workerGroupSpecs"][0].pop("maxReplicas")
    assert any("maxReplica" in e for e in validate(typo))
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][1]["minReplicas"] = "zero"
    assert any("minReplicas" in e for e in validate(wrong))
    pod_typo = copy.deepcopy(cluster)  # inside the pod template (the Kubernetes part of the CRD)
    pod_typo["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert any("resource" in e for e in validate(pod_typo))
    cron = copy.deepcopy(by_kind("RayCronJob"))
    del cron["spec"]["schedule"]
    assert any("schedule" in e for e in validate(cron))
    account = copy.deepcopy(by_kind("ServiceAccount"))
    account["metadata"]["annotation"] = {}
    assert validate(account)


def test_the_three_cluster_specs_are_the_same():
    cluster = by_kind("RayCluster")["spec"]
    assert by_kind("RayJob")["spec"]["rayClusterSpec"] == cluster
    assert by_kind("RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"] == cluster


def _configs(tmp_path):
    data = by_kind("ConfigMap")["data"]
    out = {}
    for key, text in data.items():
        (tmp_path / key).write_text(text)
        out[key] = load_nightly_config(tmp_path / key)  # [tag] checked field by field; [nightly] when present
    return out


def _quantity(value: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3}
    match = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|m)?", str(value))
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


def test_worker_groups_fit_the_pipeline_settings(tmp_path):
    configs = _configs(tmp_path)
    spec = by_kind("RayCluster")["spec"]
    assert (
        spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    )  # the driver's node does no decode or tagging
    assert spec["authOptions"]["mode"] == "token"  # the dashboard and job API take no anonymous requests
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-decode", "gpu-tag"}

    def container(group):
        (c,) = group["template"]["spec"]["containers"]
        assert (
            c["resources"]["requests"] == c["resources"]["limits"]
        )  # Guaranteed QoS: Ray's view = the pod's
        return c["resources"]["limits"]

    decode, gpu = container(groups["cpu-decode"]), container(groups["gpu-tag"])
    assert "nvidia.com/gpu" not in decode
    for cfg in configs.values():
        tag = cfg.tag
        assert _quantity(decode["cpu"]) >= tag.decode_cpus
        assert _quantity(gpu["nvidia.com/gpu"]) == tag.gpus_per_actor == 1  # one actor per GPU pod
        assert _quantity(gpu["cpu"]) >= tag.tagger_cpus + tag.decode_cpus  # the actor plus decode beside it
        assert groups["gpu-tag"]["maxReplicas"] >= tag.tagger_actors  # the autoscaler can place every actor
        assert tag.model[0].startswith("/models/") and tag.ray_address == "auto"
    for group in [spec["headGroupSpec"], *groups.values()]:
        pod = group["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert (
            volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"]
            == by_kind("PersistentVolumeClaim")["metadata"]["name"]
        )
        assert (
            volumes[mounts["/etc/tagpipe"]]["configMap"]["name"] == by_kind("ConfigMap")["metadata"]["name"]
        )
        assert pod["serviceAccountName"] == by_kind("ServiceAccount")["metadata"]["name"]
        (source,) = pod["containers"][0]["envFrom"]
        assert (
            source["secretRef"]["name"] == by_kind("Secret")["metadata"]["name"]
            and source["secretRef"]["optional"]
        )


def test_entrypoints_name_files_the_image_ships(tmp_path):
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M) and re.search(
        r"^COPY --chown=ray:ray jobs \./jobs$", dockerfile, re.M
    )
    data = by_kind("ConfigMap")["data"]
    entrypoints = {
        "RayJob": by_kind("RayJob")["spec"]["entrypoint"],
        "RayCronJob": by_kind("RayCronJob")["spec"]["jobTemplate"]["entrypoint"],
    }
    for kind, entrypoint in entrypoints.items():
        argv = shlex.split(entrypoint)
        assert argv[0] == "python" and argv[1].startswith("/app/jobs/"), kind
        script = ROOT / argv[1].removeprefix("/app/")
        assert script.is_file() and "from pipeline.cli import main" in script.read_text(), kind
        config = argv[argv.index("--config") + 1]
        assert config.startswith("/etc/tagpipe/") and config.removeprefix("/etc/tagpipe/") in data, kind
    assert "nightly" in entrypoints["RayCronJob"] and "nightly.toml" in entrypoints["RayCronJob"]


def test_dockerfile_cuda_base_non_root_and_cpu_variant():
    text = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(
        r"nvidia/cuda:13\.[0-9.]+-cudnn-runtime-ubuntu[0-9.]+", base
    )  # onnxruntime-gpu 1.31: CUDA 13 + cuDNN 9
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M) and "--build-arg BASE_IMAGE=ubuntu" in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    install = text.index(
        'pip install ".[cluster]"'
    )  # ray[default]: the dashboard and job server RayJob submits to
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(d.startswith("ray[default]") for d in pyproject["project"]["optional-dependencies"]["cluster"])
    assert (
        users and users[-1] not in ("root", "0") and text.rindex("USER ") < install
    )  # installed and run as the user
    assert (
        "export PATH=/opt/tagpipe/bin:$PATH' > /etc/profile.d/" in text
    )  # login shells (KubeRay's bash -l) find the venv
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in dockerignore and ".venv" in dockerignore


def test_cluster_launcher_config_validates_against_rays_schema(tmp_path):
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "infra" / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"]["CPU"] == 0
    tag = load_nightly_config(_write(tmp_path, by_kind("ConfigMap")["data"]["nightly.toml"])).tag
    assert (
        nodes["gpu-tag"]["resources"]["GPU"] == tag.gpus_per_actor
        and nodes["gpu-tag"]["max_workers"] >= tag.tagger_actors
    )
    assert nodes["gpu-tag"]["resources"]["CPU"] >= tag.tagger_cpus + tag.decode_cpus
    assert "-v /models:/models:ro" in config["docker"]["run_options"]
    broken = copy.deepcopy(config)
    broken["docker"]["imagee"] = broken["docker"].pop("image")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def _write(tmp_path, text):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_secret_example_holds_no_real_values():
    (secret,) = [
        doc for name, doc in documents() if doc["kind"] == "Secret" and name == "secret.example.yaml"
    ]
    assert set(secret["stringData"]) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert (
        secret["stringData"]["AWS_ACCESS_KEY_ID"]
        == secret["stringData"]["AWS_SECRET_ACCESS_KEY"]
        == "REPLACE_ME"
    )
