"""`tokenmill chat` and `tokenmill complete`: terminal clients of a running server (streaming)."""

from __future__ import annotations

import json
import os
import sys

import httpx


def _headers(api_key: str | None) -> dict:
    key = api_key or os.environ.get("TOKENMILL_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _first_model(client: httpx.Client, url: str) -> str:
    r = client.get(f"{url}/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def _stream(client: httpx.Client, url: str, route: str, body: dict, out=sys.stdout) -> str:
    """POST with stream=true, print the text as it arrives, return all of it."""
    pieces = []
    with client.stream("POST", f"{url}{route}", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            raise SystemExit(f"error {r.status_code}: {r.text}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise SystemExit(f"error: {event['error']['message']}")
            for choice in event.get("choices", []):
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                pieces.append(text)
                out.write(text)
                out.flush()
    out.write("\n")
    return "".join(pieces)


def run_complete(args) -> int:
    url = args.url.rstrip("/")
    with httpx.Client(headers=_headers(args.api_key), timeout=None) as client:
        model = args.model or _first_model(client, url)
        _stream(client, url, "/v1/completions",
                {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens,
                 "temperature": args.temperature})
    return 0


def run_chat(args) -> int:
    url = args.url.rstrip("/")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    with httpx.Client(headers=_headers(args.api_key), timeout=None) as client:
        model = args.model or _first_model(client, url)
        print(f"chatting with {model} at {url} (Ctrl-D or /quit to leave)")
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if line.strip() in ("/quit", "/exit"):
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            reply = _stream(client, url, "/v1/chat/completions",
                            {"model": model, "messages": messages,
                             "max_tokens": args.max_tokens, "temperature": args.temperature})
            messages.append({"role": "assistant", "content": reply})


def add_client_args(p) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="Server base URL.")
    p.add_argument("--api-key", default=None, help="API key (or TOKENMILL_API_KEY).")
    p.add_argument("--model", default=None, help="Model name (default: the server's first).")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
