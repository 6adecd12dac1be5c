"""How long an apply that changes nothing takes: the command's own time, beyond Python's start.

    python bench/noop_apply.py [--runs 30] [--python PYTHON]

``--python`` times the commands with another interpreter, for example a venv holding a plain (not editable)
``pip install .``: an editable install adds its own import hook to every start, and this checkout's site
packages pre-import modules that a node's Python would not.

Measures, on a sample node root holding containerd's default 1.6 config with two mirrors applied:
  - in-process: imports of the CLI, then cli.main(["apply", ...]) (median and p90 over the runs);
  - whole process: `regmirror apply ...` minus `python -c pass`, as a person would feel it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--restart", "never", "--mirror", "quay.io=https://quay.tencentcloudcr.com",
        "--mirror", "docker.io=https://mirror.ccs.tencentyun.com"]


def sample_node(folder: Path) -> Path:
    (folder / "etc/containerd").mkdir(parents=True)
    default = subprocess.run(["containerd", "config", "default"], capture_output=True, text=True, check=True).stdout
    (folder / "etc/containerd/config.toml").write_text(default)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--python", default=sys.executable, help="interpreter for the whole-process timings")
    options = parser.parse_args()
    runs, python = options.runs, options.python
    work = Path(tempfile.mkdtemp())
    try:
        node = sample_node(work / "node")
        apply = ["apply", "--root", str(node), *ARGS]
        t0 = time.perf_counter()
        from regmirror_agent import cli
        import_ms = (time.perf_counter() - t0) * 1000
        assert cli.main(apply) == 0  # the changing apply
        inproc = []
        for _ in range(runs):
            out = io.StringIO()
            t = time.perf_counter()
            with contextlib.redirect_stdout(out):
                assert cli.main(apply) == 0
            inproc.append((time.perf_counter() - t) * 1000)
            assert "unchanged" in out.getvalue()

        def wall(cmd: list[str]) -> float:
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            return (time.perf_counter() - t) * 1000

        bare = [wall([python, "-c", "pass"]) for _ in range(runs)]
        full = [wall([python, "-m", "regmirror_agent.cli", *apply]) for _ in range(runs)]
        median, p90 = statistics.median(inproc), sorted(inproc)[int(len(inproc) * 0.9) - 1]
        print(f"runs={runs}")
        print(f"import of regmirror_agent.cli (once, cold in this process): {import_ms:.1f} ms")
        print(f"no-op apply in process: median {median:.1f} ms, p90 {p90:.1f} ms")
        print(f"{python} -c pass: median {statistics.median(bare):.1f} ms; "
              f"regmirror apply (no-op) process: median {statistics.median(full):.1f} ms")
        print(f"command's own time beyond Python's start: median "
              f"{statistics.median(full) - statistics.median(bare):.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
