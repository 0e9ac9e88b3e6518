"""Shared by the launcher tests: a MODELS_DIR holding a copy of the SmolLM2 demo GGUF, the launcher as a
real process on the test database, and waiting for a replica's row to reach a state."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.processes import ROOT, free_port

from .conftest import REDIS_URL, test_database_url

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Small and quiet engines: one thread each (the test machines have two cores), a small KV pool.
ENGINE_ARGS = "--threads 1 --log-level warning"


def models_dir_with_smollm2(root: Path) -> Path:
    from engine.loader import demo_model_path

    directory = root / "models"
    directory.mkdir()
    try:  # a hard link is a file inside MODELS_DIR (a symlink out of it would be refused)
        os.link(demo_model_path(), directory / GGUF_NAME)
    except OSError:  # another filesystem
        shutil.copyfile(demo_model_path(), directory / GGUF_NAME)
    return directory


class LauncherProcess:
    """`manage.py launcher` with its output collected (for assertions and failure messages)."""

    def __init__(self, models_dir: Path, state_dir: Path):
        low = free_port()
        env = {
            **os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": test_database_url(),
            "REDIS_URL": REDIS_URL, "MODELS_DIR": str(models_dir), "LAUNCHER_STATE_DIR": str(state_dir),
            "LAUNCHER_POLL_SECONDS": "0.3", "LAUNCHER_PORT_RANGE": f"{low}-{low + 40}",
            "LAUNCHER_ENGINE_ARGS": ENGINE_ARGS, "LOG_LEVEL": "WARNING",
        }
        env.pop("TEST_DATABASE_NAME", None)
        self.process = subprocess.Popen([sys.executable, "manage.py", "launcher"], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_output(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert time.monotonic() < deadline and self.process.poll() is None, f"no {text!r} in:\n{self.output}"
            time.sleep(0.1)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def engine_pids(self) -> set[int]:
        return {int(pid) for pid in re.findall(r"\(pid (\d+)", self.output)}

    def stop(self, *, engines_too: bool = False) -> None:
        """SIGTERM (its engines keep running, for the next launcher to adopt), or with them (a test's cleanup:
        an engine runs in its own session, so nothing else would end it)."""
        if engines_too:
            for pid in self.engine_pids():
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wait_for(replica, condition, timeout: float, launcher: LauncherProcess | None = None):
    """Refresh `replica` until `condition(replica)`; the launcher's output in the failure message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replica.refresh_from_db()
        if condition(replica):
            return replica
        time.sleep(0.2)
    tail = launcher.output[-3000:] if launcher else ""
    raise AssertionError(f"{replica}: status {replica.status}, last error {replica.last_error!r}\n{tail}\n"
                         f"{replica.log_tail}")


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def write_metadata_gguf(path: Path, architecture: str = "llama", context_length: int = 4096) -> Path:
    """A GGUF file with a model's metadata and one Q8_0 tensor: what the source listing reads (no engine
    could serve it, which the listing does not check: it never loads weights)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(context_length)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_merges(["a b"])
    data = gguf.quants.quantize(np.ones((4, 32), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
