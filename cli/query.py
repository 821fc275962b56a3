"""``openllm-clone query``: ask a running server."""

from __future__ import annotations

import typer

from openllm_clone.client import APIError, HTTPClient

from ._common import API_KEY_OPTION, ENDPOINT_OPTION, fail, out

app = typer.Typer()


@app.command("query")
def query(
    prompt: str = typer.Argument(..., help="The prompt."),
    endpoint: str = ENDPOINT_OPTION,
    api_key: str | None = API_KEY_OPTION,
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they come."),
    chat: bool = typer.Option(
        True, "--chat/--raw", help="Use the chat template (default) or send the raw prompt."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 is greedy."),
    adapter_name: str | None = typer.Option(None, "--adapter-name", "-a", help="Adapter to use."),
    timeout: float = typer.Option(600.0, help="Seconds before giving up."),
) -> None:
    """Send PROMPT to the server and print the answer."""
    try:
        with HTTPClient(endpoint, api_key=api_key, timeout=timeout) as client:
            if chat:
                messages = [{"role": "user", "content": prompt}]
                params = {"max_tokens": max_new_tokens, "temperature": temperature}
                if stream:
                    for chunk in client.chat_stream(messages, model=adapter_name, **params):
                        for choice in chunk.get("choices", []):
                            out.print(choice["delta"].get("content") or "", end="", soft_wrap=True)
                    out.print()
                else:
                    answer = client.chat(messages, model=adapter_name, **params)
                    out.print(answer["choices"][0]["message"]["content"], soft_wrap=True)
                return
            params = {"max_new_tokens": max_new_tokens, "temperature": temperature}
            if stream:
                for event in client.generate_stream(prompt, adapter_name=adapter_name, **params):
                    for output in event.outputs:
                        out.print(output.text, end="", soft_wrap=True)
                out.print()
            else:
                result = client.generate(prompt, adapter_name=adapter_name, **params)
                out.print(result.outputs[0].text, soft_wrap=True)
    except APIError as exc:
        fail(str(exc))
