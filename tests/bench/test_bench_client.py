"""`bench serve`'s HTTP client against a server that drops kept-alive connections."""

from __future__ import annotations

import asyncio
import json

from tokenmill.bench.serve import BenchRequest, client_args, run_benchmark


class OneRequestPerConnection:
    """A streaming completions server on a loopback port that answers one request per
    connection, without saying so: a second request on the same connection is read and the
    connection closed unanswered (as llama.cpp's HTTP library does once a connection has
    served its quota, or idled too long, while a client is reusing it)."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.answered = 0
        self.dropped = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                if served:
                    self.dropped += 1
                    return
                events = [{"choices": [{"index": 0, "text": f"t{i}"}]}
                          for i in range(self.tokens)]
                events.append({"choices": [], "usage": {"prompt_tokens": 4,
                                                        "completion_tokens": self.tokens}})
                body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
                body += b"data: [DONE]\n\n"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Connection: keep-alive\r\nContent-Length: %d\r\n\r\n" % len(body)
                             + body)
                await writer.drain()
                served += 1
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def test_no_request_fails_on_a_connection_the_server_dropped():
    async def main():
        fake = OneRequestPerConnection(tokens=3)
        srv = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        reqs = [BenchRequest(prompt=[1, 2, 3, 4], prompt_len=4, output_len=3) for _ in range(5)]
        args = client_args(f"http://127.0.0.1:{port}", "m", max_concurrency=1, timeout=30)
        args.no_progress = True
        async with srv:
            result, _ = await run_benchmark(args, reqs)
        return fake, result

    fake, result = asyncio.run(asyncio.wait_for(main(), 60))
    assert result["failed"] == 0, result["errors"]
    assert result["completed"] == 5 and result["total_output_tokens"] == 15
    assert fake.answered == 5 and fake.dropped == 0
