"""`regmirror uninstall` waits for exactly the nodes that still hold something of regmirror's."""

from __future__ import annotations

from regmirror_agent.uninstalling import pending


def test_a_node_is_done_only_when_its_report_says_0_of_0() -> None:
    reports = {
        "a": {"status": {"ready": "0/0", "message": ""}},
        "b": {"status": {"ready": "1/2", "message": "quay-io: containerd did not come back"}},
        "c": {},  # its agent has not written a status yet
    }
    assert pending(reports) == {"b": "1/2 quay-io: containerd did not come back", "c": "no report yet"}


def test_no_report_left_means_nothing_to_wait_for() -> None:
    assert pending({}) == {}
