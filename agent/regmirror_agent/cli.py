"""``regmirror``: the node engine as a command, for node bootstrap scripts and hands-on use.

Exit status: 0 the node now has what was asked (changed or already so); 2 invalid input; 1 refused or failed,
and then every file is exactly as it was. Every flag has an environment twin (``REGMIRROR_<FLAG>``) so the
DaemonSet and init scripts can configure it without rewriting command lines.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import re
import sys
from collections.abc import Callable, Sequence

from regmirror_agent import observing
from regmirror_agent.defaults import CONFIG_FILE, DAEMON_JSON, DEFAULT_STATE_DIR, MODES, RUNTIMES
from regmirror_agent.nodefiles import NodeRoot

TYPE_CHECKING = False  # typing's own constant costs an import of typing on every run
if TYPE_CHECKING:
    from regmirror_agent.settings import Settings
    from regmirror_api import models

# An apply that changes nothing is answered from the last apply's record (regmirror_agent.observing) before
# the model, the planners or tomlkit are imported: those come in only when there is something to check or plan.

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def _env(name: str, default: str) -> str:
    return os.environ.get(f"REGMIRROR_{name.upper().replace('-', '_')}", default)


def _twin(flag: str) -> str:
    return f"--{flag} (or REGMIRROR_{flag.upper().replace('-', '_')})"


def parse_restart(value: str) -> str:
    if value in ("never", "auto", "systemd") or (value.startswith("command:") and value[len("command:"):].strip()):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: expected never, auto, systemd or command:CMD "
                                     f"(from {_twin('restart')})")


def _choice(flag: str, choices: Sequence[str]) -> Callable[[str], str]:
    """argparse checks ``choices`` on the command line only; an environment twin's value needs this."""
    def parse(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{value!r}: expected one of {', '.join(choices)} (from {_twin(flag)})")
        return value
    return parse


def parse_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 86400:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds between 0 and 86400 "
                                         f"(from {_twin('health-timeout')})")
    return seconds


def parse_node_path(flag: str) -> Callable[[str], str]:
    """A path on the node (``--config``, ``--state-dir``): absolute and normalized, as the engine reads it."""
    def parse(value: str) -> str:
        if not value.startswith("/") or posixpath.normpath(value) != value or "\x00" in value:
            raise argparse.ArgumentTypeError(f"{value!r}: expected an absolute, normalized path on the node "
                                             f"(from {_twin(flag)})")
        return value
    return parse


#: A label value as Kubernetes writes it on a Node (the key's rule is models.LABEL_KEY_PATTERN).
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")


def parse_node_labels(value: str) -> dict[str, str] | None:
    """``k=v,k2=v2``: this node's labels, for the nodeSelector of ``-f`` documents. Empty: not given."""
    if not value.strip():
        return None
    from regmirror_api import models

    labels: dict[str, str] = {}
    for item in value.split(","):
        key, sep, label = item.strip().partition("=")
        if not sep or not re.match(models.LABEL_KEY_PATTERN, key) or len(key) > 317 or not _LABEL_VALUE.match(label):
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE with a Kubernetes label key and value, "
                                             f"for example pool=gpu,kubernetes.io/os=linux (from "
                                             f"{_twin('node-labels')})")
        if key in labels:
            raise argparse.ArgumentTypeError(f"{key!r} is given twice (from {_twin('node-labels')})")
        labels[key] = label
    return labels


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=_env("root", "/"),
                   help="the node's filesystem root (default /; the agent passes the host mount)")
    p.add_argument("--runtime", choices=RUNTIMES, type=_choice("runtime", RUNTIMES), default=_env("runtime", "auto"))
    p.add_argument("--restart", type=parse_restart, default=_env("restart", "auto"),
                   help="never | auto | systemd | command:CMD (default auto: only when config.toml changed)")
    p.add_argument("--state-dir", type=parse_node_path("state-dir"), default=_env("state-dir", DEFAULT_STATE_DIR),
                   help="where, under --root, regmirror keeps what the node had before it (default %(default)s)")
    p.add_argument("--config", dest="config_file", type=parse_node_path("config"), default=_env("config", CONFIG_FILE),
                   help="containerd's config.toml on the node (default %(default)s)")
    p.add_argument("--containerd-address", default=_env("containerd-address", "") or None,
                   help="containerd socket for the health check (default: config.toml's [grpc] address)")
    p.add_argument("--docker-host", default=_env("docker-host", os.environ.get("DOCKER_HOST", "")) or None,
                   help="dockerd's address for confirming a reload (default: $DOCKER_HOST)")
    p.add_argument("--health-timeout", type=parse_seconds, default=_env("health-timeout", "60"),
                   help="seconds to wait for the CRI plugin after a restart before rolling back")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regmirror", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    apply = sub.add_parser("apply", help="set this node's registry mirrors (the whole desired set)")
    _common(apply)
    apply.add_argument("--mirror", action="append", default=[], metavar="REGISTRY=URL[,URL...]",
                       help="mirror REGISTRY through URLs tried in order; repeat for more registries")
    apply.add_argument("-f", "--filename", action="append", default=[],
                       help="YAML file of RegistryMirror documents (- for stdin); repeatable")
    apply.add_argument("--node-labels", type=parse_node_labels, default=_env("node-labels", ""), metavar="K=V,...",
                       help="this node's labels: -f documents whose spec.nodeSelector does not select them are "
                            "skipped; without it, a document with a nodeSelector is refused")
    apply.add_argument("--credentials", default=_env("credentials", "") or None, metavar="FILE",
                       help="a Docker config.json ({\"auths\": {\"mirror.host:port\": {\"auth\": ...}}}, readable "
                            "by its owner only): each mirror whose host has an entry sends that login (hosts mode "
                            "only); -f documents' credentials.secretName are served from it by host")
    apply.add_argument("--mode", choices=MODES, type=_choice("mode", MODES), default=_env("mode", "auto"),
                       help="containerd: hosts (hosts.toml, the default whenever possible) or inline")
    apply.add_argument("--dry-run", action="store_true", help="print the diff of every file it would change")
    reset = sub.add_parser("reset", help="give the node back exactly its own configuration")
    _common(reset)
    reset.add_argument("--dry-run", action="store_true", help="print the diff of every file it would change")
    sub.add_parser("agent", help="run as the cluster agent (DaemonSet): regmirror agent --help")
    sub.add_parser("uninstall", help="delete every RegistryMirror and wait until every node has its own "
                                     "configuration back (before deleting the install): regmirror uninstall --help")
    show = sub.add_parser("show", help="what this node's runtime uses, per registry")
    _common(show)
    show.add_argument("-o", "--output", choices=("text", "json"), default="text")
    return parser


def read_sources(filenames: list[str]) -> list[tuple[str, str]]:
    """The text of every ``-f`` file (``-`` is stdin), read once: it is both the request and what gets parsed."""
    sources = []
    for filename in filenames:
        try:
            if filename == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(filename, "rb") as f:
                    data = f.read()
            text = data.decode("utf-8")
        except OSError as exc:
            from regmirror_api import models

            raise models.InvalidSpec([f"{filename}: {exc.strerror or exc}"]) from exc
        except UnicodeDecodeError as exc:
            from regmirror_api import models

            raise models.InvalidSpec([f"{filename}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it "
                                      f"as UTF-8"]) from exc
        sources.append((filename, text))
    return sources


def _strict_loader() -> type:
    """PyYAML's safe loader, refusing a key given twice in one mapping: YAML says keys are unique, and PyYAML
    would otherwise keep the last one without a word (kubectl refuses them too)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
            seen: set[object] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: construct_mapping below says so in YAML's words
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                        key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return StrictLoader


def _selected(doc: object, mirror: models.RegistryMirror, labels: dict[str, str] | None) -> bool:
    """Does this document's ``spec.nodeSelector`` pick this node? Without the node's labels a selector cannot be
    answered, and applying a mirror meant for other nodes is worse than refusing."""
    from regmirror_api import contract, models

    spec = doc.get("spec") if isinstance(doc, dict) else None
    selector = spec.get("nodeSelector") if isinstance(spec, dict) else None
    if not selector:
        return True
    if labels is None:
        raise models.InvalidSpec([f"RegistryMirror {mirror.name!r} has a spec.nodeSelector, and this "
                                  f"node's labels were not given: pass --node-labels KEY=VALUE,... (or "
                                  f"REGMIRROR_NODE_LABELS) so regmirror can tell whether it selects this node"])
    return contract.selects(models.without_nulls(selector), labels)


def load_desired(args: argparse.Namespace, sources: list[tuple[str, str]],
                 credentials_file: list[object]) -> list[models.RegistryMirror]:
    import yaml

    from regmirror_api import models

    desired = models.parse_cli_mirrors(args.mirror)
    labels = getattr(args, "node_labels", None)
    loader = _strict_loader()
    skipped: list[str] = []
    for filename, text in sources:
        try:
            docs = [d for d in yaml.load_all(text, Loader=loader) if d is not None]  # a SafeLoader
        except yaml.YAMLError as exc:
            raise models.InvalidSpec([f"{filename}: not valid YAML: {exc}"]) from exc
        except RecursionError as exc:
            raise models.InvalidSpec([f"{filename}: nested too deeply to be a RegistryMirror"]) from exc
        problems: list[str] = []
        for i, doc in enumerate(docs):
            try:
                mirror = models.parse_document(doc, i)
                if _selected(doc, mirror, labels):
                    desired.append(mirror)
                else:
                    skipped.append(mirror.name)
            except models.InvalidSpec as exc:
                problems += [f"{filename}: {p}" for p in exc.problems]
        if problems:
            raise models.InvalidSpec(problems)
    models.check_unique_registries(desired)
    desired = _with_credentials(desired, getattr(args, "credentials", None), credentials_file)
    for name in skipped:
        _say(f"skipped: RegistryMirror {name!r}: its nodeSelector does not select this node")
    if args.command == "apply" and not desired:
        raise models.InvalidSpec([("no RegistryMirror given selects this node, so there is nothing to apply"
                                   if skipped else "nothing to apply: give --mirror REGISTRY=URL or -f FILE")
                                  + " (to remove every mirror, run `regmirror reset`)"])
    return desired


def credentials_identity(filename: str | None) -> list[object]:
    """What identifies the credentials file's content without holding it (for the request key: a rotated file
    is a new request, and no hash of a password is kept anywhere). Refuses a file others may read: it holds
    passwords, and a node bootstrap that left it open to every user has already leaked them once."""
    if not filename:
        return []
    from regmirror_api import models

    try:
        st = os.stat(filename)
    except OSError as exc:
        raise models.InvalidSpec([f"--credentials {filename!r}: {exc.strerror or exc}"]) from exc
    if st.st_mode & 0o077:
        raise models.InvalidSpec([f"--credentials {filename!r}: mode {st.st_mode & 0o777:04o} lets others read "
                                  f"the passwords in it; make it readable by its owner only "
                                  f"(chmod 600 {filename}) and run again"])
    return [os.path.abspath(filename), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size]


def _with_credentials(desired: list[models.RegistryMirror], filename: str | None,
                      identity: list[object]) -> list[models.RegistryMirror]:
    """``desired`` with the logins of ``--credentials FILE`` (``identity``: the file's, ``credentials_identity``,
    taken once for the request key too)."""
    from regmirror_agent import credentials
    from regmirror_api import models

    if not filename:
        problems = credentials.unresolved(desired)
        if problems:
            raise models.InvalidSpec(problems)
        return desired
    try:
        with open(filename, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise models.InvalidSpec([f"--credentials {filename!r}: cannot be read ({exc})"]) from exc
    try:
        doc = credentials.parse_auths_file(text, filename)
        return credentials.resolve_from_file(desired, doc, filename, "-".join(map(str, identity[1:])))
    except credentials.CredentialsProblem as exc:
        raise models.InvalidSpec([str(exc)]) from exc


def settings_from(args: argparse.Namespace) -> Settings:
    from regmirror_agent.settings import Settings

    return Settings(root=args.root, runtime=args.runtime, restart=args.restart,
                           mode=getattr(args, "mode", "auto"), dry_run=getattr(args, "dry_run", False),
                           state_dir=args.state_dir, config_file=args.config_file,
                           containerd_address=args.containerd_address, docker_host=args.docker_host,
                           health_timeout=args.health_timeout)


def _say(line: str) -> None:
    print(line, flush=True)


def check_root(root: str) -> None:
    """A missing ``--root`` is a typo in the command, not a node to refuse: say so before anything reads it."""
    if not os.path.isdir(root):
        from regmirror_api import models

        raise models.InvalidSpec([f"--root {root!r} is not a directory; expected the node's filesystem root "
                                  f"(/ on the node itself)"])


def run_apply(args: argparse.Namespace) -> int:
    check_root(args.root)
    sources = read_sources(args.filename) if args.command == "apply" else []
    dry_run = getattr(args, "dry_run", False)
    labels = getattr(args, "node_labels", None)
    identity = credentials_identity(getattr(args, "credentials", None))
    request = observing.request_key([args.command, sorted(getattr(args, "mirror", [])), [t for _, t in sources],
                                     *([sorted(labels.items())] if labels else []),
                                     *([["credentials", *identity]] if identity else []),
                                     observing.request_settings(args.runtime, getattr(args, "mode", "auto"),
                                                                args.config_file, DAEMON_JSON, args.state_dir)])
    if not dry_run and observing.already_applied(NodeRoot(args.root), args.state_dir, request):
        _say("unchanged: this node already has the requested configuration")
        return EXIT_OK
    desired = load_desired(args, sources, identity) if args.command == "apply" else []
    settings = settings_from(args)
    from regmirror_agent import engine

    with engine.locked(settings):
        return _plan_and_execute(desired, settings, request)


def _plan_and_execute(desired: list[models.RegistryMirror], settings: Settings, request: str) -> int:
    from regmirror_agent import drivers, engine

    plan, runtime = engine.plan(desired, settings, request)
    driver = drivers.named(runtime)
    if settings.dry_run:
        sys.stdout.write(plan.diff())
        for note in plan.notes:
            _say(f"note: {note}")
        _say(f"dry run: {len(plan.changes)} file(s) would change on {runtime}"
             + (f", then a {driver.kind}" if plan.restart else "") + "; nothing was written")
        return EXIT_OK
    outcome = engine.execute(plan, runtime, settings, _say)
    for note in outcome.notes:
        _say(f"note: {note}")
    if not outcome.changed:
        _say(f"unchanged: this node's {runtime} already has the requested configuration")
    else:
        _say(f"done: {len(plan.changes)} file(s) changed on {runtime}"
             + (f", {driver.activated}" if outcome.restarted else ""))
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    from regmirror_agent import engine

    check_root(args.root)
    runtime, header, rows, state = engine.describe(settings_from(args))
    owned = set(state.files)
    if args.output == "json":
        import json

        print(json.dumps({"runtime": runtime, "config": header, "registries": [
            {"registry": r.registry, "mirrors": list(r.mirrors), "source": r.source,
             "managedByRegmirror": r.source in owned} for r in rows]}, indent=2))
        return EXIT_OK
    print(f"runtime: {runtime}\n{header}")
    if not rows:
        print("no registry mirrors: every image is pulled from its own registry")
        return EXIT_OK
    width = max(len(r.registry) for r in rows) + 2
    print(f"{'REGISTRY':<{width}}{'MANAGED':<9}MIRRORS (in order, then the registry itself)")
    for r in rows:
        managed = "yes" if r.source in owned else "no"
        print(f"{r.registry:<{width}}{managed:<9}{', '.join(r.mirrors) or '-'}   [{r.source}]")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["agent"]:  # the DaemonSet's long-running mode: its own flags, see regmirror_agent.agent
        from regmirror_agent import agent

        return agent.main(argv[1:])
    if argv[:1] == ["uninstall"]:  # the cluster's uninstall: every RegistryMirror, then wait for every node
        from regmirror_agent import uninstalling

        return uninstalling.main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse said what was wrong (exit 2) or printed --help (exit 0)
        return exc.code if isinstance(exc.code, int) else EXIT_INVALID
    from regmirror_api.errors import InvalidSpec, RegmirrorError

    try:
        if args.command == "show":
            return run_show(args)
        return run_apply(args)
    except InvalidSpec as exc:
        for problem in exc.problems:
            print(f"regmirror: invalid input: {problem}", file=sys.stderr)
        print("regmirror: nothing was changed", file=sys.stderr)
        return EXIT_INVALID
    except RegmirrorError as exc:  # refused or failed on purpose; anything else is a bug and keeps its traceback
        print(f"regmirror: error: {exc}", file=sys.stderr)
        return EXIT_FAILED

if __name__ == "__main__":
    sys.exit(main())
