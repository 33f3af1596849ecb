"""Static checks of the deployment files (no Docker here): compose, KubeRay, the Dockerfile and
docs/cluster.md must agree with the code: its settings, its commands, its ports and its pins."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import importlib.util
import re
import shlex
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
KUBERAY = ROOT / "docker" / "kuberay" / "raycluster.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DOCS = ROOT / "docs" / "cluster.md"
PACKAGES = ("studies", "workers", "service")

API, HEAD, WORKER = "api", "ray-head", "ray-worker"
SECRETS = ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN", "LADDER_API_TOKEN")
# Where the click options of each CLI are declared, inside its installed distribution.
CLI_SOURCES = {
    "ray": ("ray", ("ray/scripts/scripts.py", "ray/dashboard/modules/job/cli.py")),
    "mlflow": ("mlflow", ("mlflow/cli/__init__.py", "mlflow/utils/cli_args.py")),
}


# --------------------------------------------------------------------------- loading


@cache
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "compose.yaml has no services"
    return doc


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


@cache
def kuberay() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d is not None]


def raycluster() -> dict[str, Any]:
    found = [d for d in kuberay() if d.get("kind") == "RayCluster"]
    assert len(found) == 1, f"expected one RayCluster in {KUBERAY.name}, found {len(found)}"
    return found[0]


def ray_groups() -> list[tuple[str, dict[str, Any]]]:
    """(group name, group spec) for the head and each worker group."""
    spec = raycluster()["spec"]
    return [("head", spec["headGroupSpec"]), *((g["groupName"], g) for g in spec["workerGroupSpecs"])]


def ray_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, pod spec, container) for every container of the RayCluster."""
    return [(name, g["template"]["spec"], c) for name, g in ray_groups() for c in g["template"]["spec"]["containers"]]


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def docker_args() -> dict[str, str]:
    """ARG defaults; an ARG declared in several stages must have one default."""
    args: dict[str, str] = {}
    for ins, rest in dockerfile():
        if ins == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            assert args.setdefault(name, default) == default, f"ARG {name} has two defaults"
    return args


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, rest in dockerfile():
        if ins == "ENV":
            env |= dict(tok.split("=", 1) for tok in shlex.split(rest))
    return env


@cache
def docs() -> str:
    return DOCS.read_text()


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ------------------------------------------------------------------------ interpolation

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: object) -> str:
    """Compose interpolation: `${X:-d}` gives d, a required or plain `${X}` a placeholder."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.groups()
        return arg if op in (":-", "-") else f"x{name}"

    return _VAR.sub(sub, str(value).replace("$$", "\0")).replace("\0", "$")


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def command_of(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command") or []
    return [str(t) for t in (shlex.split(cmd) if isinstance(cmd, str) else cmd)]


def flag_value(cmd: list[str], flag: str) -> str | None:
    for i, tok in enumerate(cmd):
        if tok == flag and i + 1 < len(cmd):
            return cmd[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """target path -> source (named volume or host path), short or long syntax."""
    out = {}
    for v in svc.get("volumes") or []:
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source", ""), v["target"]
        out[target] = source
    return out


def volume_under(svc: dict[str, Any], path: str) -> str | None:
    """The volume that holds `path` in this service (its deepest mount above it)."""
    hits = [t for t in mounts(svc) if PurePosixPath(path).is_relative_to(t)]
    return mounts(svc)[max(hits, key=len)] if hits else None


@cache
def ray_agent_port() -> int:
    """Ray's default dashboard-agent port (the worker healthcheck calls it), read from Ray itself."""
    text = Path(str(md.distribution("ray").locate_file("ray/_private/ray_constants.py"))).read_text()
    m = re.search(r"^DEFAULT_DASHBOARD_AGENT_LISTEN_PORT\s*=\s*(\d+)", text, re.M)
    assert m, "ray no longer defines DEFAULT_DASHBOARD_AGENT_LISTEN_PORT: check the ray-worker healthcheck"
    return int(m.group(1))


def listening_ports(svc: dict[str, Any]) -> set[int]:
    """The ports a compose service listens on, from its command (and PostgreSQL's default)."""
    cmd = [interpolate(t) for t in command_of(svc)]
    ports = {int(v) for f in ("--port", "--dashboard-port") if (v := flag_value(cmd, f))}
    if cmd[:2] == ["ray", "start"]:
        ports.add(ray_agent_port())
    if str(svc.get("image", "")).startswith("postgres"):
        ports.add(5432)
    return ports


def documented_ports() -> set[int]:
    section = docs().split("\n## Ports", 1)[1].split("\n## ", 1)[0]
    ports = {int(p) for p in re.findall(r"^\|\s*(\d+)\s*\|", section, re.M)}
    assert ports, "docs/cluster.md has no '## Ports' table"
    return ports


# ------------------------------------------------------------------------ the settings


def _env_names_of_settings(cls: Any) -> set[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    names = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        if isinstance(alias, str):
            names.add(alias.upper())
        elif choices:
            names |= {c.upper() for c in choices if isinstance(c, str)}
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            yield module, ast.parse(path.read_text(), str(path))


@cache
def settings_env_names() -> frozenset[str]:
    """LADDER_* names of the fields of every pydantic BaseSettings class in the packages
    (studies.settings.Settings and whatever service/ adds), read from model_fields."""
    from pydantic_settings import BaseSettings

    from studies.settings import Settings

    names: set[str] = set()
    for module, tree in _modules():
        for node in ast.walk(tree):
            bases = [ast.unparse(b) for b in node.bases] if isinstance(node, ast.ClassDef) else []
            if isinstance(node, ast.ClassDef) and any(b.endswith("Settings") for b in bases):
                cls = getattr(importlib.import_module(module), node.name, None)
                if isinstance(cls, type) and issubclass(cls, BaseSettings):
                    names |= _env_names_of_settings(cls)

    assert _env_names_of_settings(Settings) <= names
    return frozenset(n for n in names if n.startswith("LADDER_"))


@cache
def known_env_names() -> frozenset[str]:
    """Settings fields plus the LADDER_* names the code reads directly (e.g. os.environ.get)."""
    direct = {
        node.value
        for _, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"LADDER_[A-Z0-9_]+", node.value)
    }
    return settings_env_names() | direct


# --------------------------------------------------------------------------- commands


def _docs_commands() -> Iterator[list[str]]:
    """Commands in the docs' bash blocks, leading VAR=value assignments dropped."""
    for block in re.findall(r"```bash\n(.*?)```", docs(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            toks = shlex.split(line, comments=True)
            while toks and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", toks[0]):
                toks.pop(0)
            if toks:
                yield toks


def _split_nested(cmd: list[str]) -> list[list[str]]:
    """`ray job submit ... -- python -m x` is two commands."""
    if "--" in cmd:
        i = cmd.index("--")
        return [cmd[:i], cmd[i + 1 :]]
    return [cmd]


def deployed_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every ladder / ray / mlflow / python command that the files run."""
    cmds: list[tuple[str, list[str]]] = []
    for name, svc in services().items():
        if svc.get("command"):
            cmds.append((f"compose {name}", [interpolate(t) for t in command_of(svc)]))
    for ins, rest in dockerfile():
        if ins == "CMD":
            cmds.append(("Dockerfile CMD", [str(t) for t in yaml.safe_load(rest)]))
    for group, g in ray_groups():  # KubeRay runs `ray start` with rayStartParams as --key=value
        params = [f"--{k}={v}" for k, v in (g.get("rayStartParams") or {}).items()]
        cmds.append((f"kuberay {group}", ["ray", "start", *(["--head"] if group == "head" else []), *params]))
    for _, _, c in ray_containers():
        for key in ("command", "args"):
            if c.get(key):
                cmds.append((f"kuberay {c['name']} {key}", [str(t) for t in c[key]]))
    for toks in _docs_commands():
        cmds.append(("docs/cluster.md", toks))
    return [(where, part) for where, cmd in cmds for part in _split_nested(cmd) if part]


def _console_script_dists(name: str) -> set[str]:
    return {ep.dist.name for ep in md.entry_points(group="console_scripts", name=name) if ep.dist is not None}


@cache
def _cli_source(tool: str) -> str:
    dist, files = CLI_SOURCES[tool]
    texts = [Path(str(md.distribution(dist).locate_file(f))) for f in files]
    found = [p.read_text() for p in texts if p.exists()]
    assert found, f"none of {files} in the installed {dist}: update CLI_SOURCES"
    return "\n".join(found)


def check_command(where: str, argv: list[str]) -> list[str]:
    """Problems with one command line; an empty list when it is fine."""
    tool = argv[0]
    if tool == "ladder":
        from studies.cli import build_parser

        if "ladder" not in pyproject()["project"]["scripts"]:
            return [f"{where}: `ladder` is not in pyproject [project.scripts]"]
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit:
            return [f"{where}: `{shlex.join(argv)}` is rejected by the ladder CLI"]
        return []
    if tool in CLI_SOURCES:
        dist = CLI_SOURCES[tool][0]
        if not any(d in (dist, f"{dist}-skinny") for d in _console_script_dists(tool)):
            return [f"{where}: no `{tool}` console script in the installed {dist}"]
        source = _cli_source(tool)
        flags = [t.split("=", 1)[0] for t in argv[1:] if t.startswith("--") and len(t) > 2]
        return [
            f"{where}: `{tool}` has no option {f}"
            for f in flags
            if not re.search(rf"[\"'/]{re.escape(f)}[\"'/]", source)
        ]
    if tool == "python" and argv[1:2] == ["-m"]:
        ok = importlib.util.find_spec(argv[2]) is not None
        return [] if ok else [f"{where}: no module {argv[2]} for `python -m`"]
    return []


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("path", [COMPOSE, KUBERAY], ids=lambda p: p.name)
def test_deploy_yaml_parses(path: Path) -> None:
    docs_ = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs_ and all(isinstance(d, dict) for d in docs_)


def test_compose_has_the_documented_services() -> None:
    assert {"postgres", "mlflow", HEAD, WORKER, API} <= set(services())


def test_every_compose_service_has_a_healthcheck_its_image_can_run() -> None:
    installed = " ".join(rest for ins, rest in dockerfile() if ins == "RUN" and "apt-get install" in rest)
    for name, svc in services().items():
        hc = svc.get("healthcheck") or {}
        test = hc.get("test")
        assert test and not hc.get("disable") and test != ["NONE"], f"{name} has no healthcheck"
        argv = shlex.split(test[1]) if test[0] == "CMD-SHELL" else test[1:]
        assert test[0] in ("CMD", "CMD-SHELL") and argv, f"{name}: bad healthcheck {test}"
        if str(svc.get("image", "")).startswith("ladder:") and argv[0] in ("curl", "wget"):
            assert re.search(rf"\b{argv[0]}\b", installed), f"{name}'s healthcheck needs {argv[0]}: the image lacks it"
        urls = [urlsplit(t) for t in argv if t.startswith("http")]
        for u in urls:  # a healthcheck asks the service itself, on a port it listens on
            assert u.hostname in ("localhost", "127.0.0.1"), f"{name}'s healthcheck asks {u.hostname}"
            assert u.port in listening_ports(svc), f"{name}'s healthcheck calls port {u.port}, not one it listens on"
        if argv[0] == "pg_isready":
            assert int(flag_value(argv, "-p") or 5432) in listening_ports(svc)


def test_dependencies_wait_for_healthy_services() -> None:
    for name, svc in services().items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on must give conditions"
        for dep, cond in deps.items():
            assert dep in services(), f"{name} depends on unknown {dep}"
            assert cond.get("condition") == "service_healthy", f"{name} must wait for {dep} to be healthy"
            assert "profiles" not in services()[dep], f"{name} depends on {dep}, which only starts with a profile"
    always_on = {n for n, s in services().items() if "profiles" not in s and n != API}
    assert set(services()[API].get("depends_on") or {}) == always_on, "the API must wait for every other service"


def test_ladder_env_names_in_deploy_files_are_settings() -> None:
    used: dict[str, set[str]] = {}

    def note(where: str, text: str) -> None:
        for n in re.findall(r"\bLADDER_[A-Z0-9_]+\b", text):
            used.setdefault(n, set()).add(where)

    note("compose.yaml", COMPOSE.read_text())
    note("raycluster.yaml", KUBERAY.read_text())
    note("Dockerfile", DOCKERFILE.read_text())
    note("entrypoint.sh", ENTRYPOINT.read_text())
    unknown = {n: sorted(w) for n, w in used.items() if n not in known_env_names()}
    assert not unknown, f"LADDER_* names no setting or code reads: {unknown}"
    assert "LADDER_API_TOKEN" in used and "LADDER_API_TOKEN" in known_env_names()


def test_ports_match_the_documented_ones() -> None:
    documented = documented_ports()
    exposed = {int(p.split("/")[0]) for ins, rest in dockerfile() if ins == "EXPOSE" for p in rest.split()}
    assert exposed == {8000, 6379, 8265, 5000}
    assert exposed <= documented
    for name, svc in services().items():
        listening = listening_ports(svc) - {ray_agent_port()}  # the agent port stays inside the container
        assert listening <= documented, f"{name} listens on undocumented {listening - documented}"
        for p in svc.get("ports") or []:
            target = int(p["target"]) if isinstance(p, dict) else int(interpolate(p).split(":")[-1].split("/")[0])
            assert target in listening, f"{name} publishes {target} but listens on {sorted(listening)}"
    assert flag_value(command_of(services()[API]), "--port") == "8000"
    assert flag_value(command_of(services()["mlflow"]), "--port") == "5000"
    head = command_of(services()[HEAD])
    assert (flag_value(head, "--port"), flag_value(head, "--dashboard-port")) == ("6379", "8265")
    for _, _, c in ray_containers():
        ports = {int(p["containerPort"]) for p in c.get("ports") or []}
        assert ports <= documented, f"kuberay {c['name']} opens undocumented {ports - documented}"


def test_urls_point_at_compose_services_and_ports() -> None:
    init_sql = str((compose().get("configs") or {}).get("postgres-init", {}).get("content", ""))
    pg_env = env_of(services()["postgres"])
    databases = {pg_env.get("POSTGRES_DB", pg_env.get("POSTGRES_USER", "postgres"))}
    databases |= set(re.findall(r"CREATE DATABASE\s+(\w+)", init_sql, re.I))

    def check(where: str, url: str) -> str | None:
        u = urlsplit(interpolate(url))
        if u.hostname not in services():
            return u.hostname
        target = services()[u.hostname]
        assert u.port in listening_ports(target), f"{where}: {u.hostname} does not listen on {u.port}"
        if u.scheme.startswith("postgresql"):
            assert u.path.strip("/") in databases, f"{where}: database {u.path} is never created"
            assert u.password == "xPOSTGRES_PASSWORD" and u.username == pg_env["POSTGRES_USER"], where
        return u.hostname

    for name, svc in services().items():
        for key, value in env_of(svc).items():
            if re.match(r"(https?|postgresql[+\w]*)://", value):
                check(f"{name} {key}", value)
    api = env_of(services()[API])
    assert check("LADDER_RAY_ADDRESS", api["LADDER_RAY_ADDRESS"]) == HEAD
    assert urlsplit(api["LADDER_RAY_ADDRESS"]).port == 8265, "Ray Jobs listen on the dashboard port"
    assert check("LADDER_MLFLOW_TRACKING_URI", api["LADDER_MLFLOW_TRACKING_URI"]) == "mlflow"
    assert check("LADDER_REGISTRY_URL", api["LADDER_REGISTRY_URL"]) == "postgres"
    assert check("LADDER_OPTUNA_STORAGE", api["LADDER_OPTUNA_STORAGE"]) == "postgres"
    assert check(
        "mlflow --backend-store-uri", flag_value(command_of(services()["mlflow"]), "--backend-store-uri") or ""
    )
    address = flag_value(command_of(services()[WORKER]), "--address") or ""
    assert check("ray-worker --address", f"ray://{address}") == HEAD, f"workers join {address!r}, not the head"
    assert urlsplit(f"ray://{address}").port == int(flag_value(command_of(services()[HEAD]), "--port") or 0)


def test_ray_nodes_and_their_client_share_token_paths_and_volume() -> None:
    ray_services = [n for n, s in services().items() if command_of(s)[:2] == ["ray", "start"]]
    assert HEAD in ray_services and WORKER in ray_services
    api = env_of(services()[API])
    for name in [*ray_services, API]:
        env = env_of(services()[name])
        assert env.get("RAY_AUTH_MODE") == "token", f"{name} needs RAY_AUTH_MODE=token"
        assert env.get("RAY_AUTH_TOKEN", "").startswith("${RAY_AUTH_TOKEN:?"), f"{name} needs the required token"
        for key in ("LADDER_DATA_DIR", "LADDER_STORAGE_PATH"):
            assert env.get(key) == api[key], f"{name} sees {key}={env.get(key)}, the API {api[key]}"
            assert PurePosixPath(api[key]).is_absolute()
            assert volume_under(services()[name], api[key]) == volume_under(services()[API], api[key]) is not None, (
                f"{key} is not on the shared volume in {name}"
            )
    for name in ray_services:  # a driver inside a Ray Job must use the RAY_ADDRESS that Ray Jobs sets
        assert "LADDER_RAY_ADDRESS" not in env_of(services()[name]), f"{name} must not get LADDER_RAY_ADDRESS"
    artifacts = flag_value(command_of(services()["mlflow"]), "--artifacts-destination") or ""
    assert volume_under(services()["mlflow"], artifacts) == volume_under(services()[API], api["LADDER_DATA_DIR"])


def test_secrets_must_be_provided() -> None:
    text = COMPOSE.read_text()
    for name in SECRETS:
        uses = re.findall(rf"\$\{{{name}([^}}]*)\}}", text)
        assert uses, f"compose never uses {name}"
        assert all(u.startswith(":?") for u in uses), f"${{{name}}} must be required (`${{{name}:?...}}`)"
    for name, svc in services().items():
        for key, value in env_of(svc).items():
            if key in SECRETS:
                assert value.startswith(f"${{{key}:?"), f"{name} gives {key} a literal value"
    for _, _, c in ray_containers():
        env = {e["name"]: e for e in c.get("env") or []}
        assert env["RAY_AUTH_MODE"].get("value") == "token", f"kuberay {c['name']} needs RAY_AUTH_MODE=token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"].get("valueFrom", {}), "the Ray token must come from a Secret"
        assert "LADDER_RAY_ADDRESS" not in env, f"kuberay {c['name']} must not get LADDER_RAY_ADDRESS"


def test_raycluster_has_head_workers_shared_storage_and_resources() -> None:
    rc = raycluster()
    assert rc["apiVersion"] == "ray.io/v1"
    ray_version = md.version("ray")
    assert rc["spec"]["rayVersion"] == ray_version, f"rayVersion must be the installed ray {ray_version}"
    assert rc["spec"]["workerGroupSpecs"], "no worker group"
    claims = {d["metadata"]["name"]: d for d in kuberay() if d.get("kind") == "PersistentVolumeClaim"}
    images = set()
    for group, pod, c in ray_containers():
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        shared = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/shared"]
        assert shared, f"kuberay {group}: /shared is not mounted"
        claim = volumes[shared[0]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim in claims and "ReadWriteMany" in claims[claim]["spec"]["accessModes"], claim
        res = c.get("resources") or {}
        assert res.get("requests") and res.get("limits"), f"kuberay {group}: set requests and limits"
        images.add(c["image"].rsplit(":", 1)[0])
    assert len(images) == 1, f"head and workers must run the Ladder image, found {images}"


def test_commands_exist_with_their_options() -> None:
    cmds = deployed_commands()
    tools = {argv[0] for _, argv in cmds}
    assert {"ladder", "ray", "mlflow", "python"} <= tools, f"expected commands missing: found {tools}"
    assert any(argv[:3] == ["python", "-m", "workers.driver"] for _, argv in cmds)
    problems = [p for where, argv in cmds for p in check_command(where, argv)]
    assert not problems, "\n".join(problems)


def test_check_command_catches_typos() -> None:
    assert check_command("t", ["ray", "start", "--head", "--dashboard-hots=0.0.0.0"])
    assert check_command("t", ["mlflow", "server", "--artifact-destination", "/x"])
    assert check_command("t", ["ladder", "serv", "--host", "0.0.0.0"])
    assert check_command("t", ["python", "-m", "workers.no_such_driver"])
    assert not check_command("t", ["ray", "start", "--address=ray-head:6379", "--block"])


def test_dockerfile_pins_cpu_torch_and_runs_as_a_user() -> None:
    deps = pyproject()["project"]["dependencies"]
    pins = [d.split("==", 1)[1] for d in deps if re.match(r"torch\s*==", d)]
    assert pins == ["2.13.0"], f"pyproject must pin torch==2.13.0, found {pins}"
    args = docker_args()
    assert args["VARIANT"] == "cpu" and args["TORCH_VERSION"] == pins[0]
    assert args["TORCH_CPU_INDEX"].rstrip("/").endswith("/cpu")
    install = next(rest for ins, rest in dockerfile() if ins == "RUN" and "torch==" in rest)
    assert '"torch==${TORCH_VERSION}"' in install
    assert re.search(r'\bcpu\)\s*index="\$\{TORCH_CPU_INDEX\}"', install), "VARIANT=cpu must use the CPU index"
    assert re.search(r"\bcuda\)", install), "VARIANT=cuda is documented: keep its branch"
    runs = [rest for ins, rest in dockerfile() if ins == "RUN"]
    assert runs.index(install) < next(i for i, r in enumerate(runs) if "pip install ." in r), "torch before ."
    users = [rest for ins, rest in dockerfile() if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    volumes = [v for ins, rest in dockerfile() if ins == "VOLUME" for v in yaml.safe_load(rest)]
    env = docker_env()
    for key in ("LADDER_DATA_DIR", "LADDER_STORAGE_PATH"):
        assert any(PurePosixPath(env[key]).is_relative_to(v) for v in volumes), f"{key} is not on a volume"


def test_docs_mention_every_setting_and_compose_variable() -> None:
    missing = sorted(n for n in settings_env_names() if f"`{n}`" not in docs())
    assert not missing, f"docs/cluster.md does not document {missing}"
    variables = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text()))
    missing = sorted(v for v in variables if f"`{v}`" not in docs())
    assert not missing, f"docs/cluster.md does not document the compose variables {missing}"
    for build_arg in ("VARIANT", "GIT_SHA", "TORCH_VERSION"):
        assert f"`{build_arg}`" in docs()
