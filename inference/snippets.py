"""Ready-to-paste calls of the API (curl, Python `openai`, JavaScript `openai`) for the quickstart page
and the one-time key reveal; the key is read from MAAS_API_KEY, never written into the code."""

from __future__ import annotations

import json

PROMPT = "Say hello in one short sentence."
PLACEHOLDER_MODEL = "MODEL_NAME"


def quickstart(base_url: str, model: str | None) -> dict[str, str]:
    """The same chat completion three ways; `model` None (nothing allowed yet) leaves a placeholder."""
    model = model or PLACEHOLDER_MODEL
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}]}, indent=2)
    curl = (
        f"curl {base_url}/chat/completions \\\n"
        '  -H "Authorization: Bearer $MAAS_API_KEY" \\\n'
        '  -H "Content-Type: application/json" \\\n'
        f"  -d '{body}'\n"
    )
    python = (
        "import os\n\n"
        "from openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{base_url}", api_key=os.environ["MAAS_API_KEY"])\n'
        "response = client.chat.completions.create(\n"
        f"    model={json.dumps(model)},\n"
        f'    messages=[{{"role": "user", "content": {json.dumps(PROMPT)}}}],\n'
        ")\n"
        "print(response.choices[0].message.content)\n"
    )
    javascript = (
        'import OpenAI from "openai";\n\n'
        f'const client = new OpenAI({{ baseURL: "{base_url}", apiKey: process.env.MAAS_API_KEY }});\n'
        "const response = await client.chat.completions.create({\n"
        f"  model: {json.dumps(model)},\n"
        f'  messages: [{{ role: "user", content: {json.dumps(PROMPT)} }}],\n'
        "});\n"
        "console.log(response.choices[0].message.content);\n"
    )
    return {"curl": curl, "python": python, "javascript": javascript}
