"""`manage.py runplatform`: the whole platform on one machine, for a first look and for development.

Starts an engine process on the demo model (or --model), registers it in the catalog, makes sure an
admin and one authorization code exist, then serves the console, admin and /v1 API with uvicorn.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
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
        parser.add_argument("--startup-timeout", type=float, default=300.0)

    def handle(self, *args, **options):
        model_path = options["model"] or str(self.demo_model_path())
        call_command("migrate", interactive=False, verbosity=0)
        admin_line = self.ensure_admin()
        engine_url = f"http://127.0.0.1:{options['engine_port']}"
        engine = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--model", model_path, "--port", str(options["engine_port"]),
             "--served-model-name", options["model_name"], "--dtype", options["dtype"]],
            preexec_fn=_terminate_with_parent,
        )
        try:
            context_length = self.wait_for_engine(engine, engine_url, options["startup_timeout"])
            call_command("add_model", options["model_name"], engine_url=engine_url,
                         context_length=context_length, verbosity=0)
            code_line = self.ensure_code()
            base = f"http://{options['host']}:{options['port']}"
            self.stdout.write(self.style.SUCCESS("\nThe platform is running:"))
            self.stdout.write(f"  console    {base}/  (sign up; verification mail is printed here)")
            self.stdout.write(f"  admin      {base}/admin/  {admin_line}")
            self.stdout.write(f"  API        {base}/v1  (model {options['model_name']!r}, key from the console)")
            self.stdout.write(f"  engine     {engine_url}  ({model_path})")
            self.stdout.write(f"  {code_line}\n")
            import uvicorn

            uvicorn.run("maas.asgi:application", host=options["host"], port=options["port"], log_level="info",
                        timeout_graceful_shutdown=5)
        finally:
            engine.terminate()
            try:
                engine.wait(timeout=10)
            except subprocess.TimeoutExpired:
                engine.kill()

    @staticmethod
    def demo_model_path():
        from engine.loader import demo_model_path

        return demo_model_path()

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

    def wait_for_engine(self, engine: subprocess.Popen, url: str, timeout: float) -> int:
        """Poll /health until the model is loaded; returns the served context length."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if engine.poll() is not None:
                raise CommandError(f"The engine exited with status {engine.returncode} while starting.")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    models = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
                    return int(models[0].get("max_model_len") or 2048)
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise CommandError(f"The engine did not become healthy within {timeout:.0f} s.")
