"""Issue 19's done-when, end to end: the launcher as a real process, an admin adding a model from a source
under a temporary MODELS_DIR and starting a replica, the `openai` client chatting with it through the real
gateway, `kill -9` of the engine brought back by the launcher, and *stop* taking it out of routing and
ending the process. Real PostgreSQL (the audit triggers), a real engine on the SmolLM2 demo GGUF."""

from __future__ import annotations

import html
import os
import re
import signal
import time

import openai
import pytest
from django.test import Client

from accounts.models import User
from inference.models import AIModel, Replica, ReplicaEvent, ReplicaState, ReplicaStatus

from .conftest import make_tenant
from .launcher_helpers import GGUF_NAME, LauncherProcess, models_dir_with_smollm2, pid_alive, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]


def inline_management_data(response) -> dict[str, str]:
    """The management forms of the admin page's inline formsets, as a browser would post them."""
    data = {}
    for inline in response.context["inline_admin_formsets"]:
        form = inline.formset.management_form
        data.update({f"{form.prefix}-{name}": str(form[name].value() or 0) for name in form.fields})
    return data


def add_from_source(client: Client, source_id: str) -> AIModel:
    """Model sources page -> its *Add to the catalog* link -> the pre-filled add form, posted as shown."""
    page = client.get("/admin/inference/aimodel/sources/")
    assert page.status_code == 200
    text = page.content.decode()
    row = re.search(rf'<tr class="source" data-source="{re.escape(source_id)}">(.*?)</tr>', text, re.S).group(1)
    assert "llama" in row and "Q4_1" in row and "8192" in row and "servable" in row, row
    link = html.unescape(re.search(r'href="(/admin/inference/aimodel/add/\?[^"]+)"', row).group(1))
    form_page = client.get(link)
    form = form_page.context["adminform"].form
    data = {name: form[name].value() for name in form.fields if form[name].value() not in (None, [])}
    data.update(enabled="on", **inline_management_data(form_page))
    response = client.post("/admin/inference/aimodel/add/", data)
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else response
    return AIModel.objects.get(source=source_id)


def test_a_model_added_from_a_source_is_served_restarted_after_kill_9_and_stopped(gateway, tmp_path):
    models_dir = models_dir_with_smollm2(tmp_path)
    launcher = LauncherProcess(models_dir, tmp_path / "state")
    started = time.monotonic()
    try:
        admin = User.objects.create_superuser("ops@example.com", "pw-not-used-123")
        client = Client()
        client.force_login(admin)
        with pytest.MonkeyPatch.context() as patch:  # the admin (this process) sees the same MODELS_DIR
            from django.conf import settings

            patch.setattr(settings, "MODELS_DIR", str(models_dir))
            model = add_from_source(client, GGUF_NAME)
            assert (model.name, model.kind, model.context_length) == ("smollm2-135m-instruct", "chat", 8192)

            # The engine options are the replica's fields (the *Start a replica* action takes the defaults).
            add_page = client.get("/admin/inference/replica/add/")
            assert {"dtype", "quantization", "device", "kv_cache_memory", "max_num_seqs", "max_model_len"} <= set(
                add_page.context["adminform"].form.fields)
            response = client.post("/admin/inference/replica/add/", {
                "model": model.pk, "dtype": "bfloat16", "quantization": "dense", "device": "cpu", "kv_cache_memory": "64MiB",
                "max_num_seqs": 4, "max_model_len": 1024}, REMOTE_ADDR="198.51.100.4")
            assert response.status_code == 302, response.context["adminform"].form.errors
        replica = Replica.objects.get(model=model)
        [created] = ReplicaEvent.objects.filter(pgh_obj_id=replica.pk, pgh_label="insert")
        assert created.pgh_context.metadata["user"] == admin.pk
        assert created.pgh_context.metadata["ip"] == "198.51.100.4"
        print(f"admin flow: {time.monotonic() - started:.1f} s")

        wait_for(replica, lambda r: r.status == ReplicaStatus.RUNNING, 150, launcher)
        first_pid = replica.pid
        assert "--max-num-seqs 4 --device cpu --dtype bfloat16 --quantization dense --kv-cache-memory 64MiB" in replica.log_tail
        print(f"first start: {time.monotonic() - started:.1f} s")
        tenant = make_tenant("launched")
        client_ai = openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0)

        def chat() -> str:
            reply = client_ai.chat.completions.create(
                model=model.name, temperature=0, max_tokens=8,
                messages=[{"role": "user", "content": "What is the capital of France?"}])
            assert reply.usage.completion_tokens > 0
            return reply.choices[0].message.content

        assert "Paris" in chat()

        killed = time.monotonic()
        os.kill(first_pid, signal.SIGKILL)
        wait_for(replica, lambda r: r.status == ReplicaStatus.RUNNING and r.pid != first_pid, 120, launcher)
        print(f"back after kill -9: {time.monotonic() - killed:.1f} s")
        second_pid = replica.pid
        assert replica.restarts == 1
        assert "The engine exited with status -9" in launcher.output
        assert "Paris" in chat()

        # The launcher's own restart: the next one adopts the running engine instead of starting another.
        launcher.stop()
        assert pid_alive(second_pid)
        launcher = LauncherProcess(models_dir, tmp_path / "state")
        launcher.lines.append(f"(pid {second_pid}")  # for the cleanup, should this launcher not adopt it
        launcher.wait_output(f"Adopted the running engine of {replica} (pid {second_pid}", 60)
        assert "Paris" in chat()

        stopping = time.monotonic()
        response = client.post("/admin/inference/replica/", {"action": "stop", "_selected_action": [replica.pk]})
        assert response.status_code == 302
        wait_for(replica, lambda r: r.status == ReplicaStatus.STOPPED, 40, launcher)
        print(f"stopped: {time.monotonic() - stopping:.1f} s")
        assert replica.desired == ReplicaState.STOPPED and replica.pid is None
        replica.deployment.refresh_from_db()
        assert not replica.deployment.enabled
        assert not pid_alive(second_pid) and not pid_alive(first_pid), launcher.output  # the adopted engine too
        assert "Starting the engine" not in launcher.output
        with pytest.raises(openai.APIStatusError) as refused:
            chat()
        assert refused.value.status_code == 503
        stopped = ReplicaEvent.objects.filter(pgh_obj_id=replica.pk, pgh_label="update").latest("pgh_id")
        assert stopped.desired == ReplicaState.STOPPED and stopped.pgh_context.metadata["user"] == admin.pk
    finally:
        launcher.stop(engines_too=True)
        print(f"launcher test: {time.monotonic() - started:.1f} s")

