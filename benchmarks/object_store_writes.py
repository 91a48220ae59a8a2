"""What a whole-or-nothing small write costs on an object store: `RunLayout.write_bytes` (a temporary
object under `<run>/_tmp/`, then a server-side move to the name: PUT, COPY, DELETE) against one PUT
straight to the name (what it did before 2026-12-04, which an interrupted writer could leave empty).

    .venv/bin/python benchmarks/object_store_writes.py [--writes 200]

Runs moto's S3 server on 127.0.0.1 (in memory; a real store adds its network round trip to every
request, so there the ratio tends to the request count, about 3), alternates the two ways in rounds
so both see the same machine, and records milliseconds per write and their ratio for a pointer-sized
object (~100 B) and a 64 KiB one in benchmarks/results/object_store_writes.json.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_result  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def moto_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **CREDENTIALS}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            return server, endpoint
        except urllib.error.HTTPError:
            return server, endpoint
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                sys.exit("moto's S3 server did not start (pip install 'moto[server]')")
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=200, help="writes of each size, each way")
    args = parser.parse_args()
    import pyarrow.fs as pafs

    from ipr_dist.run_layout import RunLayout

    os.environ.update(CREDENTIALS)
    server, endpoint = moto_server()
    try:
        pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir("bench")
        layout = RunLayout("s3://bench/run", endpoint)

        def one_put(rel: str, data: bytes) -> None:
            with layout.fs.open_output_stream(layout.path(rel)) as f:
                f.write(data)

        sizes = {"pointer (~100 B)": b'{"dir": "v-20261204180000-0123abcd", "time": 1764871200.0, "step": 600}',
                 "64 KiB": os.urandom(64 << 10)}
        result = {"benchmark": "object_store_writes", "store": "moto S3 server on 127.0.0.1", "writes": args.writes,
                  "sizes": {}}
        for label, data in sizes.items():
            spent = {"one PUT": 0.0, "write_bytes": 0.0}
            for _ in range(10):  # warm-up: connections, moto's first requests
                one_put("warm/x", data)
                layout.write_bytes("warm/y", data)
            for i in range(args.writes):
                for name, write in (("one PUT", one_put), ("write_bytes", layout.write_bytes))[:: 1 if i % 2 else -1]:
                    t = time.perf_counter()
                    write(f"bench/{name.replace(' ', '_')}/LATEST.json", data)
                    spent[name] += time.perf_counter() - t
            ms = {k: 1e3 * v / args.writes for k, v in spent.items()}
            result["sizes"][label] = {"one_put_ms": round(ms["one PUT"], 3), "write_bytes_ms": round(ms["write_bytes"], 3),
                                      "ratio": round(ms["write_bytes"] / ms["one PUT"], 2)}
            print(f"{label:>18}: one PUT {ms['one PUT']:.2f} ms, write_bytes {ms['write_bytes']:.2f} ms "
                  f"(x{ms['write_bytes'] / ms['one PUT']:.2f})")
        assert layout.list_names("_tmp") == [], "write_bytes left a temporary object"
        write_result(result)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
