"""The agent's log lines name their node, as text or as one JSON object a line."""

from __future__ import annotations

import json
import logging

import pytest

from regmirror_agent import logs


def _line(capsys: pytest.CaptureFixture[str], log_format: str) -> str:
    logs.configure("worker-7", log_format)
    logging.getLogger("regmirror.agent").warning("mirror %s does not answer from this node", "https://m.example")
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_json_lines_parse_and_name_the_node(capsys: pytest.CaptureFixture[str]) -> None:
    line = json.loads(_line(capsys, "json"))
    assert line["node"] == "worker-7" and line["level"] == "warning" and line["logger"] == "regmirror.agent"
    assert line["message"] == "mirror https://m.example does not answer from this node"
    assert line["time"].endswith("+00:00")


def test_text_lines_name_the_node(capsys: pytest.CaptureFixture[str]) -> None:
    assert " WARNING node=worker-7 mirror https://m.example does not answer" in _line(capsys, "text")


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of text, json"):
        logs.configure("worker-7", "xml")


def test_the_agent_refuses_an_unknown_format_from_its_environment(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from regmirror_agent import agent

    monkeypatch.setenv("REGMIRROR_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit) as exc:
        agent.main(["--node", "worker-7"], install_signals=False, make_client=lambda: None)  # type: ignore[arg-type,return-value]
    assert exc.value.code == 2
    assert "REGMIRROR_LOG_FORMAT='xml'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["REGMIRROR_RESYNC_SECONDS", "REGMIRROR_HEALTH_TIMEOUT", "REGMIRROR_METRICS_PORT"])
def test_the_agent_refuses_a_bad_number_from_its_environment(name: str, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A usage error naming the flag (exit 2), never a traceback: the DaemonSet's env is user input."""
    from regmirror_agent import agent

    monkeypatch.setenv(name, "five")
    with pytest.raises(SystemExit) as exc:
        agent.main(["--node", "worker-7"], install_signals=False, make_client=lambda: None)  # type: ignore[arg-type,return-value]
    assert exc.value.code == 2
    assert "invalid" in capsys.readouterr().err
