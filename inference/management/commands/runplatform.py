"""`manage.py runplatform`: the whole platform on one machine, for a first look and for development.

Starts an engine process on the demo model (or --model) and one on the demo embeddings model
(all-MiniLM-L6-v2, or --embedding-model; --no-embeddings skips it), registers both in the catalog, makes
sure an admin and one authorization code exist, then serves the console, admin and /v1 API with uvicorn.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time

import httpx
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from accounts.codes import issue_codes
from accounts.models import AuthorizationCode, User


def _terminate_with_parent() -> None:
    """Linux: the engine gets SIGTERM if this process dies without cleaning up (e.g. SIGKILL)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _exit_on_sigterm(signum, frame) -> None:
    """SIGTERM (a supervisor, `kill`): leave through `finally`, which stops the engines, with status 0.
    uvicorn handles the signal while it serves, then re-raises it once it has shut down: this handler."""
    raise SystemExit(0)


class Command(BaseCommand):
    help = "Run the engine, the gateway and the console together (embedded defaults)."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--engine-port", type=int, default=8100)
        parser.add_argument("--model", help="model directory or .gguf file (default: the SmolLM2 demo model)")
        parser.add_argument("--model-name", default="smollm2-135m-instruct", help="public model name")
        parser.add_argument(
            "--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
            help="engine compute dtype; bfloat16 keeps 4-bit GGUF weights packed on CPU too (and is faster)",
        )
        parser.add_argument("--embedding-model",
                            help="encoder directory served for /v1/embeddings (default: the all-MiniLM-L6-v2 demo)")
        parser.add_argument("--embedding-model-name", default="all-minilm-l6-v2", help="its public model name")
        parser.add_argument("--embedding-engine-port", type=int, default=8101)
        parser.add_argument("--no-embeddings", action="store_true", help="serve no embeddings model")
        parser.add_argument("--startup-timeout", type=float, default=300.0)

    def handle(self, *args, **options):
        import signal

        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        model_path = options["model"] or str(self.demo_model_path())
        call_command("migrate", interactive=False, verbosity=0)
        admin_line = self.ensure_admin()
        engine_url = f"http://127.0.0.1:{options['engine_port']}"
        engine = EngineSupervisor(
            [sys.executable, "-m", "engine", "serve", "--model", model_path, "--port", str(options["engine_port"]),
             "--served-model-name", options["model_name"], "--dtype", options["dtype"]],
            engine_url, options["startup_timeout"], self.stdout,
        )
        engines = [engine]
        embedder = None
        if not options["no_embeddings"]:
            embedding_path = options["embedding_model"] or str(self.demo_embedding_model_path())
            embedding_url = f"http://127.0.0.1:{options['embedding_engine_port']}"
            embedder = EngineSupervisor(
                [sys.executable, "-m", "engine", "serve", "--model", embedding_path,
                 "--port", str(options["embedding_engine_port"]),
                 "--served-model-name", options["embedding_model_name"], "--dtype", "float32"],
                embedding_url, options["startup_timeout"], self.stdout,
            )
            engines.append(embedder)
        try:
            context_length = engine.start()
            call_command("add_model", options["model_name"], engine_url=engine_url,
                         context_length=context_length, verbosity=0)
            if embedder is not None:
                call_command("add_model", options["embedding_model_name"], engine_url=embedder.url,
                             context_length=embedder.start(), kind="embeddings", verbosity=0)
            code_line = self.ensure_code()
            base = f"http://{options['host']}:{options['port']}"
            self.stdout.write(self.style.SUCCESS("\nThe platform is running:"))
            self.stdout.write(f"  console    {base}/  (sign up; verification mail is printed here)")
            self.stdout.write(f"  admin      {base}/admin/  {admin_line}")
            self.stdout.write(f"  API        {base}/v1  (model {options['model_name']!r}, key from the console)")
            self.stdout.write(f"  engine     {engine_url}  ({model_path})")
            if embedder is not None:
                self.stdout.write(f"  embeddings {embedder.url}  (model {options['embedding_model_name']!r}, "
                                  f"{embedder.command[4]})")
            self.stdout.write(f"  {code_line}\n")
            import uvicorn

            for supervisor in engines:
                supervisor.watch()
            uvicorn.run("maas.asgi:application", host=options["host"], port=options["port"], log_level="info",
                        timeout_graceful_shutdown=5, timeout_keep_alive=75)
        finally:
            for supervisor in engines:
                supervisor.stop()

    @staticmethod
    def demo_model_path():
        from engine.loader import demo_model_path

        return demo_model_path()

    @staticmethod
    def demo_embedding_model_path():
        from engine.loader.encoder import demo_embedding_model_path

        return demo_embedding_model_path()

    def ensure_admin(self) -> str:
        if User.objects.filter(is_superuser=True).exists():
            return "(log in with your superuser)"
        email = os.environ.get("MAAS_ADMIN_EMAIL", "admin@localhost")
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser(email, password)
        return f"(created {email} / {password})"

    def ensure_code(self) -> str:
        if AuthorizationCode.objects.exists():
            return "authorization codes: issue more with `python manage.py issue_codes --count 1`"
        issued = issue_codes(1, token_quota=1_000_000, validity_days=30, note="runplatform demo code")
        return f"demo authorization code (1M tokens, 30 days): {issued[0].raw}"



class EngineSupervisor:
    """Runs the engine child and restarts it when it exits (the engine exits non-zero when it breaks, see
    the README's failure policy), as compose's `restart:` or systemd would; backoff 1 s doubling to 30 s."""

    def __init__(self, command: list[str], url: str, startup_timeout: float, out):
        self.command, self.url, self.startup_timeout, self.out = command, url, startup_timeout, out
        self.process: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.restarts = 0

    def start(self) -> int:
        """Start the engine and wait until it is healthy; returns the served context length."""
        self.process = subprocess.Popen(self.command, preexec_fn=_terminate_with_parent)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CommandError(f"The engine exited with status {self.process.returncode} while starting.")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    models = httpx.get(f"{self.url}/v1/models", timeout=5).json()["data"]
                    return int(models[0].get("max_model_len") or 2048)
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise CommandError(f"The engine did not become healthy within {self.startup_timeout:.0f} s.")

    def watch(self) -> None:
        threading.Thread(target=self._watch, name="engine-supervisor", daemon=True).start()

    def _watch(self) -> None:
        backoff = 1.0
        while not self.stopping.is_set():
            status = self.process.wait()
            if self.stopping.is_set():
                return
            self.restarts += 1
            self.out.write(f"The engine exited with status {status}; restarting it in {backoff:.0f} s "
                           f"(restart {self.restarts}).")
            if self.stopping.wait(backoff):
                return
            try:
                self.start()
                self.out.write(f"The engine is back at {self.url}.")
                backoff = 1.0
            except CommandError as exc:
                self.process.kill()
                self.out.write(f"The engine did not come back: {exc}")
                backoff = min(backoff * 2, 30.0)

    def stop(self) -> None:
        self.stopping.set()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
