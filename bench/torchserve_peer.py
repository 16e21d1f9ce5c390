"""TorchServe 0.12 as bench/serve.py's peer: its own venv under var/, the same weights, bench/torchserve_handler.py.

The venv sees Kiln's packages through a .pth file (torch is never downloaded again); pip installs
only TorchServe, its model archiver and what they need besides. Everything TorchServe writes (its
pid file, logs, model store) stays in the run's folder. Java 17 or later is required.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.12.0"
VENV = ROOT / "var" / "bench" / f"torchserve-{VERSION}"
WORKERS, BATCH_SIZE, MAX_BATCH_DELAY_MS = 2, 32, 5  # 2 workers x 1 intra-op thread, batch 32 / 5 ms
# Warnings and errors only, as Kiln runs in the benchmark (no access log): TorchServe's default INFO
# logging writes several lines per request from the Java frontend, which costs it CPU on every request.
LOG_CONFIG = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders><Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="%d %p %c: %m%n"/></Console></Appenders>
  <Loggers><Root level="warn"><AppenderRef ref="STDOUT"/></Root></Loggers>
</Configuration>
"""


def unavailable() -> str | None:
    """Why TorchServe cannot run here (no Java 17+), or None."""
    java = shutil.which("java")
    if java is None:
        return "no java on PATH (TorchServe 0.12 needs Java 17 or later)"
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    found = re.search(r'version "(\d+)', out.stderr + out.stdout)
    if found is None or int(found.group(1)) < 17:
        return f"TorchServe 0.12 needs Java 17 or later; java -version says: {(out.stderr or out.stdout).strip()[:80]}"
    return None


def install() -> Path:
    """The venv's bin folder, creating the venv on first use (RuntimeError with pip's words if that fails)."""
    stamp = VENV / ".installed"
    if stamp.exists():
        return VENV / "bin"
    if VENV.exists():
        shutil.rmtree(VENV)  # a half-made one from an interrupted run
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=600)
    python = VENV / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "kiln_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # Kiln's torch & co
    out = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
                          f"torchserve=={VERSION}", f"torch-model-archiver=={VERSION}"],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"pip could not install TorchServe {VERSION}: {(out.stderr or out.stdout)[-600:]}")
    if (Path(site) / "torch").exists():
        raise RuntimeError("TorchServe's venv got a torch of its own; it must use Kiln's")
    stamp.touch()
    return VENV / "bin"


def prepare(bin_dir: Path, work: Path, checkpoint: Path, ports: tuple[int, int, int]) -> tuple[list[str], dict]:
    """Archive the checkpoint with the handler and write TorchServe's config; (argv, environment) to start it."""
    store, tmp, logs = work / "model-store", work / "tmp", work / "logs"
    for folder in (store, tmp, logs):
        folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, work / "model.pt")
    (work / "model-config.yaml").write_text(textwrap.dedent(f"""\
        minWorkers: {WORKERS}
        maxWorkers: {WORKERS}
        batchSize: {BATCH_SIZE}
        maxBatchDelay: {MAX_BATCH_DELAY_MS}
        responseTimeout: 120
        """))
    subprocess.run([str(bin_dir / "torch-model-archiver"), "--model-name", "bench", "--version", "1.0",
                    "--serialized-file", str(work / "model.pt"), "--handler", str(ROOT / "bench/torchserve_handler.py"),
                    "--config-file", str(work / "model-config.yaml"), "--export-path", str(store), "--force"],
                   check=True, timeout=600, capture_output=True)
    inference, management, metrics = ports
    (work / "config.properties").write_text(textwrap.dedent(f"""\
        inference_address=http://127.0.0.1:{inference}
        management_address=http://127.0.0.1:{management}
        metrics_address=http://127.0.0.1:{metrics}
        model_store={store}
        default_workers_per_model={WORKERS}
        disable_token_authorization=true
        install_py_dep_per_model=false
        disable_system_metrics=true
        """))
    (work / "log4j2.xml").write_text(LOG_CONFIG)
    argv = [str(bin_dir / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
            "--model-store", str(store), "--ts-config", str(work / "config.properties"), "--models", "bench=bench.mar",
            "--log-config", str(work / "log4j2.xml")]
    env = {"KILN_ROOT": str(ROOT), "KILN_TS_THREADS": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp),
           "TEMP": str(tmp), "LOG_LOCATION": str(logs), "METRICS_LOCATION": str(logs)}
    return argv, env
