"""`manage.py render_k8s`: Kubernetes manifests for the replicas the database wants running (inference/k8s.py)."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand

from inference.k8s import TEMPLATE, render, service_url


class Command(BaseCommand):
    help = "Print a Deployment and a Service per wanted replica (kubectl apply -f -)."

    def add_arguments(self, parser):
        parser.add_argument("--namespace", default="maas")
        parser.add_argument("--image", default="maas-engine:latest", help="the engine image (platform/Dockerfile.engine)")
        parser.add_argument("--secret", default="maas-engine", help="Secret holding ENGINE_API_KEY")
        parser.add_argument("--models-claim", default="maas-models", help="PersistentVolumeClaim with MODELS_DIR")
        parser.add_argument("--template", type=Path, default=TEMPLATE)

    def handle(self, *args, **options):
        rendered = render(namespace=options["namespace"], image=options["image"], secret=options["secret"],
                          models_claim=options["models_claim"], template=options["template"])
        self.stdout.write(rendered.text)
        for line in rendered.skipped:
            self.stderr.write(f"skipped {line}")
        for replica in rendered.replicas:
            self.stderr.write(f"register {replica} as {service_url(replica, options['namespace'])}")
