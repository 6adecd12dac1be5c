"""Where things are on a node, and the choices the commands offer. Nothing imported: the CLI's fast path reads
these before deciding whether it needs anything heavier."""

CONFIG_FILE = "/etc/containerd/config.toml"
DAEMON_JSON = "/etc/docker/daemon.json"
DEFAULT_STATE_DIR = "/var/lib/regmirror"
STATE_FILE = "state.json"
RUNTIMES = ("auto", "containerd", "docker", "crio")
MODES = ("auto", "hosts", "inline")
