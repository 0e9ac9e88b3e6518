"""`manage.py launcher`: run the engine replicas the database wants on this host (inference/launcher.py)."""

from __future__ import annotations

import signal
import threading

from django.core.management.base import BaseCommand

from inference.launcher import Launcher


class Command(BaseCommand):
    help = "Start, watch and restart the engine processes of platform-run replicas (one launcher per host)."

    def add_arguments(self, parser):
        parser.add_argument("--poll", type=float, help="seconds between passes (default: LAUNCHER_POLL_SECONDS)")
        parser.add_argument("--stop-engines-on-exit", action="store_true",
                            help="stop the engines when the launcher stops (default: leave them running; "
                                 "the next launcher adopts them)")
        parser.add_argument("--echo-logs", action="store_true", help="copy the engines' output to stdout")

    def handle(self, *args, **options):
        stopping = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopping.set())
        launcher = Launcher(self.stdout, poll=options["poll"], echo_logs=options["echo_logs"],
                            own_children=options["stop_engines_on_exit"])
        self.stdout.write(f"The launcher is running (a pass every {launcher.poll:g} s).")
        launcher.run(stopping)
