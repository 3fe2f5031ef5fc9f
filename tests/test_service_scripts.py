"""The systemd install scripts (service_install.sh, service_install_venv.sh,
service_uninstall.sh), run for real with bash.

--dry-run changes nothing, not even as root on the real system; --root DIR installs the
unit and the config with the right modes and content; a second run changes nothing and
says "already"; the config is never overwritten; the unit carries every directive and
passes systemd-analyze verify; uninstall keeps the config and state unless --purge. Nothing
here touches the machine outside temporary directories: user creation and systemctl are
only ever asked for under --dry-run, and as root every run happens in a private mount
namespace where all but the test's directories are read-only.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import stat
import string
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
INSTALL = "service_install.sh"
INSTALL_VENV = "service_install_venv.sh"
UNINSTALL = "service_uninstall.sh"
SCRIPTS = [INSTALL, INSTALL_VENV, UNINSTALL]
TEMPLATE = Path("contrib/systemd/orproxy.service.in")
UNIT = Path("etc/systemd/system/orproxy.service")
CONFIG = Path("etc/orproxy/config.yml")
STATE = Path("var/lib/orproxy")
SECRET = "sk-or-v1-service-script-test-secret-7f3a"
NOBODY = 65534

# Every directive the unit must carry, each exactly once, and no others.
SERVICE_DIRECTIVES = {
    "Type": "simple", "User": "orproxy", "Group": "orproxy",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "StateDirectory": "orproxy",
    "Environment": "ORPROXY_STATE_FILE=%S/orproxy/state.json",
    "Restart": "on-failure", "RestartSec": "2",
    "KillSignal": "SIGTERM", "TimeoutStopSec": "45", "LimitNOFILE": "65536",
    "ProtectSystem": "strict", "ReadOnlyPaths": "/etc/orproxy",
    "NoNewPrivileges": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service", "CapabilityBoundingSet": "",
}
UNIT_DIRECTIVES = {"After": "network-online.target", "Wants": "network-online.target"}
INSTALL_DIRECTIVES = {"WantedBy": "multi-user.target"}


# ---------------------------------------------------------------------------- sandbox

# The scripts run as root on the machine the tests run on. So each run sees every mount
# read-only, in a private mount namespace, except the test's own directories: should a
# script (or a regression in one) write anywhere else, it fails there instead of changing
# the machine.
SANDBOX = r"""
n=$1; shift
writable=("${@:1:n}"); shift "$n"
for target in $(findmnt -rn -o TARGET); do
    case $target in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
    mount -o remount,bind,ro "$target" 2>/dev/null || true
done
for dir in "${writable[@]}"; do
    { mount --bind "$dir" "$dir" && mount -o remount,bind,rw "$dir"; } || exit 98
done
if touch /etc/.orproxy-read-only-probe 2>/dev/null; then
    rm -f /etc/.orproxy-read-only-probe
    exit 99
fi
exec "$@"
"""
WRITABLE: list[Path] = []  # the current test's directories, set by the fixture below


@functools.cache
def sandbox_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False  # not root: the scripts cannot write outside --root anyway
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                            SANDBOX, "sandbox", "0", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.fixture(autouse=True)
def writable_tmp(tmp_path: Path) -> Iterator[None]:
    # The test's directory, and the scratch /tmp, where systemd-analyze verify insists on
    # making its working directories (it ignores $TMPDIR).
    WRITABLE[:] = [tmp_path, Path("/tmp")]
    yield
    WRITABLE.clear()


# The scripts install only as root (they refuse otherwise, --dry-run aside).
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="installs need root")


# ---------------------------------------------------------------------------- helpers

def run(script: str | Path, *args: str | Path, env: dict[str, str] | None = None,
        user: int | None = None, checkout: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run one of the scripts with bash in the sandbox, in a clean environment (no
    $VIRTUAL_ENV unless given), optionally as another uid."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    if WRITABLE:
        base["TMPDIR"] = str(WRITABLE[0])  # the scripts' own temporary directories
    command = ["bash", str(checkout / script), *map(str, args)]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                   *command]
    if sandbox_available():
        command = ["unshare", "--mount", "--propagation", "private", "bash", "-c", SANDBOX,
                   "sandbox", str(len(WRITABLE)), *map(str, WRITABLE), *command]
    return subprocess.run(command, env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=120, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under root with its mode, owner, mtime and content hash."""
    out: dict[str, tuple[int, int, int, str]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        digest = (hashlib.sha256(path.read_bytes()).hexdigest()
                  if stat.S_ISREG(info.st_mode) else os.readlink(path)
                  if path.is_symlink() else "")
        out[str(path.relative_to(root))] = (info.st_mode, info.st_uid, info.st_mtime_ns,
                                            digest)
    return out


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections → (key, value) pairs in order, the way systemd reads them (no line
    continuations are used in ours)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            assert line[1:-1] not in sections, f"section {line} twice"
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def assert_unit_directives(text: str, exec_start: str, protect_home: str) -> None:
    sections = parse_unit(text)
    assert set(sections) == {"Unit", "Service", "Install"}
    expected = {"Unit": {**UNIT_DIRECTIVES}, "Install": INSTALL_DIRECTIVES,
                "Service": {**SERVICE_DIRECTIVES, "ProtectHome": protect_home,
                            "ExecStart": f"{exec_start} --config /etc/orproxy/config.yml"}}
    for name, wanted in expected.items():
        keys = [key for key, _ in sections[name]]
        assert len(keys) == len(set(keys)), f"[{name}] repeats a key: {keys}"
        pairs = {key: value for key, value in sections[name] if key != "Description"}
        assert pairs == wanted, f"[{name}]"
    assert "Description" in dict(sections["Unit"])
    # How to allow a port below 1024 is written next to the empty capability set.
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in text
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in text


def make_venv(parent: Path, name: str = "venv") -> Path:
    """A venv as the scripts see one: bin/python (the system Python) and bin/orproxy."""
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.skip("these tests build their venv on /usr/bin/python3, which is missing")
    venv = parent / name
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(python)
    (venv / "bin" / "orproxy").write_text("#!/bin/sh\necho orproxy 0\n")
    (venv / "bin" / "orproxy").chmod(0o755)
    return venv


def make_checkout(parent: Path) -> Path:
    """A copy of the files the scripts use, for tests that change one of them."""
    checkout = parent / "checkout"
    for name in [*SCRIPTS, str(TEMPLATE), "config.yml.example"]:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, checkout / name)
    return checkout


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    return make_venv(tmp_path)


@pytest.fixture
def secret_config(tmp_path: Path) -> Path:
    path = tmp_path / "my-config.yml"
    path.write_text(f'server:\n  access_key: "local-secret"\nopenrouter:\n  keys: ["{SECRET}"]\n')
    return path


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory everyone may write to (so only the scripts' own root check
    can keep an unprivileged run from writing there)."""
    path = Path(tempfile.mkdtemp(prefix="orproxy-svc-"))
    path.chmod(0o777)
    WRITABLE.append(path)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def install_args(script: str, venv: Path) -> list[str]:
    return ["--venv", str(venv)] if script == INSTALL_VENV else []


# ----------------------------------------------------------------------- invocation

@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str) -> None:
    out = ok(run(script, "--help"))
    assert out.startswith("Usage:")
    for option in ("--dry-run", "--root DIR"):
        assert option in out


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_argument_is_refused(script: str, root: Path) -> None:
    result = run(script, "--root", root, "--frobnicate")
    assert result.returncode == 2
    assert "unknown argument: --frobnicate" in result.stderr
    assert not list(root.iterdir())


@pytest.mark.parametrize("script", SCRIPTS)
def test_refuses_to_run_without_root_unless_dry_run(script: str, open_tmp: Path) -> None:
    venv = make_venv(open_tmp)
    target = open_tmp / "root"
    target.mkdir()
    target.chmod(0o777)
    user = NOBODY if os.geteuid() == 0 else None  # as root: drop to nobody first
    before = snapshot(target)
    refused = run(script, "--root", target, *install_args(script, venv), user=user)
    assert refused.returncode == 1
    assert "must run as root" in refused.stderr
    assert snapshot(target) == before
    dry = run(script, "--root", target, "--dry-run", *install_args(script, venv), user=user)
    assert "dry run" in ok(dry)
    assert snapshot(target) == before


# -------------------------------------------------------------------------- dry run

@pytest.mark.parametrize("script", [INSTALL, INSTALL_VENV])
def test_dry_run_install_prints_the_plan_and_writes_nothing(
        script: str, root: Path, venv: Path, secret_config: Path) -> None:
    before = snapshot(root)
    out = ok(run(script, "--dry-run", "--root", root, "--config-from", secret_config,
                 *install_args(script, venv)))
    assert snapshot(root) == before
    assert f"would run: install -d -m 0750 {root}/etc/orproxy" in out
    assert f"would run: install -m 0640 {secret_config} {root}/{CONFIG}" in out
    assert f"would write {root}/{UNIT} (mode 0644):" in out
    unit_text = out.split("----8<----\n")[1].rsplit("    ----8<----", 1)[0]
    exec_start = f"{venv}/bin/orproxy" if script == INSTALL_VENV else "/opt/orproxy/bin/orproxy"
    assert_unit_directives(unit_text, exec_start, "yes")
    assert "skipped (--root): create the system user orproxy" in out
    assert "skipped (--root): systemctl daemon-reload; systemctl enable --now" in out
    assert SECRET not in out


@root_only
def test_dry_run_uninstall_prints_the_plan_and_writes_nothing(root: Path, venv: Path) -> None:
    ok(run(INSTALL_VENV, "--root", root, "--venv", venv))
    (root / STATE).mkdir(parents=True)
    before = snapshot(root)
    out = ok(run(UNINSTALL, "--dry-run", "--purge", "--root", root))
    assert snapshot(root) == before
    assert f"would run: rm -f -- {root}/{UNIT}" in out
    assert f"would run: rm -rf -- {root}/etc/orproxy" in out
    assert f"would run: rm -rf -- {root}/{STATE}" in out
    assert "skipped (--root): userdel orproxy" in out


def system_paths() -> dict[str, object]:
    """What a real (not --root) run would change on this machine, and the checkout."""
    def state(path: Path) -> object:
        return snapshot(path) if path.is_dir() else path.exists()

    paths = [Path("/etc/orproxy"), Path("/") / UNIT, Path("/opt/orproxy"), Path("/") / STATE,
             Path("/etc/systemd/system/multi-user.target.wants/orproxy.service"),
             REPO / ".venv", REPO / "build"]
    entries = {str(p): state(p) for p in paths}
    for database in ("passwd", "group"):
        entries[database] = subprocess.run(["getent", database, "orproxy"],
                                           capture_output=True, text=True).stdout
    return entries


def test_dry_run_on_the_real_system_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """As root and without --root: the very run that would install for real. In the
    sandbox nothing at all is writable, not even /tmp, so any write attempt fails the
    run."""
    if os.geteuid() == 0 and not sandbox_available():
        with capsys.disabled():
            print("\nNOTE test_service_scripts: no private mount namespace here (unshare): "
                  "the scripts run as root without the read-only sandbox.")
    WRITABLE.clear()
    before = system_paths()
    install = ok(run(INSTALL, "--dry-run"))
    venv = ok(run(INSTALL_VENV, "--dry-run"))  # no $VIRTUAL_ENV: ./.venv, created if missing
    uninstall = ok(run(UNINSTALL, "--dry-run", "--purge"))
    assert system_paths() == before
    for out in (install, venv):
        if not Path("/etc/orproxy/config.yml").exists():
            assert "would run: install -m 0640 -o root -g orproxy" in out
        if not (Path("/") / UNIT).exists():
            assert "would write /etc/systemd/system/orproxy.service (mode 0644):" in out
        if Path("/run/systemd/system").is_dir():
            assert "systemctl enable --now orproxy.service" in out
        else:
            assert "systemd is not running here" in out
    if subprocess.run(["getent", "passwd", "orproxy"], capture_output=True).returncode:
        assert "would run: useradd --system" in install
    if not (REPO / ".venv").exists():
        assert f"would run: python3 -m venv {REPO}/.venv" in venv
    assert "dry run" in uninstall


# ------------------------------------------------------------------- --root installs

@root_only
def test_system_install_under_root(root: Path, secret_config: Path) -> None:
    result = run(INSTALL, "--root", root, "--config-from", secret_config)
    out = ok(result)
    assert SECRET not in out + result.stderr
    assert stat.S_IMODE((root / "etc/orproxy").stat().st_mode) == 0o750
    assert stat.S_IMODE((root / CONFIG).stat().st_mode) == 0o640
    assert (root / CONFIG).read_bytes() == secret_config.read_bytes()
    assert stat.S_IMODE((root / UNIT).stat().st_mode) == 0o644
    assert_unit_directives((root / UNIT).read_text(), "/opt/orproxy/bin/orproxy", "yes")
    assert "skipped (--root): building /opt/orproxy" in out
    assert not (root / "opt").exists()
    assert "placeholder keys" not in out


@root_only
def test_second_run_changes_nothing_and_says_already(root: Path, venv: Path) -> None:
    ok(run(INSTALL_VENV, "--root", root, "--venv", venv))
    before = snapshot(root)
    out = ok(run(INSTALL_VENV, "--root", root, "--venv", venv))
    assert snapshot(root) == before  # same bytes, modes and mtimes: nothing rewritten
    assert "    already installed" in out
    assert "    /etc/orproxy already exists" in out
    assert "    already exists: left unchanged" in out
    assert "    already up to date" in out


@root_only
def test_an_existing_config_is_never_overwritten(root: Path, venv: Path,
                                                 secret_config: Path) -> None:
    ok(run(INSTALL_VENV, "--root", root, "--venv", venv))
    edited = b"# edited by the admin\nserver: {access_key: mine}\n"
    (root / CONFIG).write_bytes(edited)
    (root / CONFIG).chmod(0o644)  # too open: the mode is put right, the content kept
    out = ok(run(INSTALL_VENV, "--root", root, "--venv", venv, "--config-from", secret_config))
    assert (root / CONFIG).read_bytes() == edited
    assert stat.S_IMODE((root / CONFIG).stat().st_mode) == 0o640
    assert "left unchanged" in out and f"chmod 0640 {root}/{CONFIG}" in out


@root_only
def test_config_comes_from_config_yml_else_the_example_with_a_loud_note(tmp_path: Path) -> None:
    checkout = make_checkout(tmp_path)
    venv = make_venv(tmp_path)
    example_root, own_root = tmp_path / "r1", tmp_path / "r2"
    example_root.mkdir()
    own_root.mkdir()
    out = ok(run(INSTALL_VENV, "--root", example_root, "--venv", venv, checkout=checkout))
    assert (example_root / CONFIG).read_bytes() == (REPO / "config.yml.example").read_bytes()
    assert "!! /etc/orproxy/config.yml is a copy of config.yml.example" in out
    again = ok(run(INSTALL_VENV, "--root", example_root, "--venv", venv, checkout=checkout))
    assert "is a copy of config.yml.example" in again  # still unedited: said again

    (checkout / "config.yml").write_text(f'openrouter:\n  keys: ["{SECRET}"]\n')
    out = ok(run(INSTALL_VENV, "--root", own_root, "--venv", venv, checkout=checkout))
    assert (own_root / CONFIG).read_bytes() == (checkout / "config.yml").read_bytes()
    assert "config.yml.example" not in out and SECRET not in out


@root_only
def test_venv_install_runs_the_venvs_program(root: Path, venv: Path, tmp_path: Path) -> None:
    other = make_venv(tmp_path, "other")
    venv_before = snapshot(venv)
    out = ok(run(INSTALL_VENV, "--root", root, env={"VIRTUAL_ENV": str(venv)}))
    assert_unit_directives((root / UNIT).read_text(), f"{venv}/bin/orproxy", "yes")
    assert f"program in the venv {venv}" in out
    ok(run(INSTALL_VENV, "--root", root, "--venv", other, env={"VIRTUAL_ENV": str(venv)}))
    assert f"ExecStart={other}/bin/orproxy --config" in (root / UNIT).read_text()
    assert snapshot(venv) == venv_before  # the venv itself is the user's: untouched


@root_only
def test_a_changed_unit_is_replaced(root: Path, venv: Path) -> None:
    ok(run(INSTALL_VENV, "--root", root, "--venv", venv))
    good = (root / UNIT).read_text()
    (root / UNIT).write_text(good.replace("RestartSec=2", "RestartSec=9"))
    out = ok(run(INSTALL_VENV, "--root", root, "--venv", venv))
    assert "differs from what this script writes: replacing it" in out
    assert (root / UNIT).read_text() == good


@root_only
def test_a_venv_under_home_gets_protecthome_read_only(root: Path) -> None:
    home = Path.home().resolve()
    if not (home == Path("/root") or home.is_relative_to("/home")):
        pytest.skip(f"home directory {home} is not under /home or /root")
    parent = Path(tempfile.mkdtemp(prefix=".orproxy-svc-test-", dir=home))
    WRITABLE.append(parent)
    try:
        venv = make_venv(parent)
        out = ok(run(INSTALL_VENV, "--root", root, "--venv", venv))
        assert_unit_directives((root / UNIT).read_text(), f"{venv}/bin/orproxy", "read-only")
        assert "ProtectHome=read-only instead of yes" in out
    finally:
        shutil.rmtree(parent)


@root_only
def test_a_path_systemd_cannot_take_is_refused(root: Path, tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "with space")
    result = run(INSTALL_VENV, "--root", root, "--venv", venv)
    assert result.returncode == 1
    assert "not usable in a systemd unit" in result.stderr
    assert not (root / UNIT).exists()
    missing = tmp_path / "with space" / "new-venv"  # refused before it is built
    result = run(INSTALL_VENV, "--root", root, "--venv", missing)
    assert result.returncode == 1 and "not usable in a systemd unit" in result.stderr
    assert not missing.exists()


UNIT_SAFE = set(string.ascii_letters + string.digits + "._+@-")


@settings(max_examples=20, deadline=None)
@given(name=st.text(alphabet=sorted(UNIT_SAFE) + list(" %$\\\n\t;'\"=#*?é"), min_size=1,
                    max_size=10).filter(lambda n: n not in (".", "..")))
def test_venv_paths_are_taken_verbatim_or_refused(name: str) -> None:
    """A blank would split ExecStart, "%" is a systemd specifier, a newline would add a
    directive of its own: such a path is refused; any other one lands in ExecStart as is."""
    parent = Path(tempfile.mkdtemp(prefix="orproxy-svc-"))
    WRITABLE[:] = [parent, Path("/tmp")]
    try:
        venv = make_venv(parent / name)
        result = run(INSTALL_VENV, "--dry-run", "--root", parent, "--venv", venv)
        if set(name) <= UNIT_SAFE:
            assert f"\nExecStart={venv}/bin/orproxy --config /etc/orproxy/config.yml\n" \
                in ok(result)
        else:
            assert result.returncode == 1, result.stdout
            assert "not usable in a systemd unit" in result.stderr
    finally:
        shutil.rmtree(parent)


# ------------------------------------------------------------------ systemd-analyze

@root_only
def test_the_unit_passes_systemd_analyze_verify(root: Path, venv: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = ok(run(INSTALL_VENV, "--root", root, "--venv", venv))
    text = (root / UNIT).read_text()
    assert_unit_directives(text, f"{venv}/bin/orproxy", "yes")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        with capsys.disabled():
            print("\nNOTE test_service_scripts: systemd-analyze is not installed (apt-get "
                  "install systemd): the unit was checked on a parsed view of its sections "
                  "and keys only, not by systemd-analyze verify.")
        assert "systemd-analyze not found" in out
        return
    assert "systemd-analyze verify: ok" in out
    result = subprocess.run([analyze, "verify", "--man=no", str(root / UNIT)],
                            capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@root_only
def test_a_unit_that_verify_rejects_is_not_installed(tmp_path: Path, root: Path,
                                                     venv: Path) -> None:
    checkout = make_checkout(tmp_path)
    template = checkout / TEMPLATE
    template.write_text(template.read_text().replace("RestartSec=2", "RestartSec=soonish"))
    result = run(INSTALL_VENV, "--root", root, "--venv", venv, checkout=checkout)
    if shutil.which("systemd-analyze") is None:
        assert "systemd-analyze not found" in ok(result)
        pytest.skip("systemd-analyze is not installed: nothing can reject the unit")
    assert result.returncode == 1
    assert "systemd-analyze verify rejects the unit" in result.stderr
    assert "soonish" in result.stderr
    assert not (root / UNIT).exists()


@root_only
def test_without_systemd_analyze_the_script_says_so(tmp_path: Path, root: Path,
                                                    venv: Path) -> None:
    """A PATH with every command of this machine except systemd-analyze."""
    farm = tmp_path / "bin"
    farm.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            target = farm / name
            if name != "systemd-analyze" and not target.exists() and not target.is_symlink():
                target.symlink_to(Path(directory) / name)
    out = ok(run(INSTALL_VENV, "--root", root, "--venv", venv, env={"PATH": str(farm)}))
    assert "note: systemd-analyze not found: the unit is not verified" in out
    assert_unit_directives((root / UNIT).read_text(), f"{venv}/bin/orproxy", "yes")


# ------------------------------------------------------------------------- uninstall

@root_only
def test_uninstall_keeps_config_and_state_unless_purge(root: Path, venv: Path) -> None:
    ok(run(INSTALL_VENV, "--root", root, "--venv", venv))
    (root / STATE).mkdir(parents=True)
    (root / STATE / "state.json").write_text("{}")
    built = root / "opt/orproxy"  # as service_install.sh leaves it on a real system
    built.mkdir(parents=True)
    (built / ".installed-by-orproxy-service-install").touch()
    config = (root / CONFIG).read_bytes()

    out = ok(run(UNINSTALL, "--root", root))
    assert not (root / UNIT).exists() and not built.exists()
    assert (root / CONFIG).read_bytes() == config and (root / STATE / "state.json").exists()
    assert "kept (--purge removes it)" in out
    assert "skipped (--root): systemctl stop orproxy.service" in out

    again = ok(run(UNINSTALL, "--root", root))
    assert "    already removed" in again
    assert (root / CONFIG).exists()

    purge = ok(run(UNINSTALL, "--root", root, "--purge"))
    assert not (root / "etc/orproxy").exists() and not (root / STATE).exists()
    assert "skipped (--root): userdel orproxy" in purge
    purge_again = ok(run(UNINSTALL, "--root", root, "--purge"))
    assert purge_again.count("    already removed") == 4  # unit, program, config, state
    assert (venv / "bin" / "orproxy").exists()  # a venv of the user's is never removed


@root_only
def test_uninstall_leaves_an_opt_orproxy_it_did_not_build(root: Path) -> None:
    foreign = root / "opt/orproxy"
    foreign.mkdir(parents=True)
    (foreign / "data").write_text("someone else's")
    out = ok(run(UNINSTALL, "--root", root, "--purge"))
    assert (foreign / "data").exists()
    assert "left in place: service_install.sh did not build it" in out


# ------------------------------------------------------------- the real venv build

@root_only
def test_creates_dot_venv_and_installs_from_a_copy(tmp_path: Path, root: Path) -> None:
    """No venv given and none active: ./.venv is created and orproxy pip-installed into it
    from a copy of the checkout, which is left without build/ or egg-info. The one slow
    test: ~6 s of CPU (a venv, and pip installing the dependencies)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listed = subprocess.run(
        ["git", "-c", f"safe.directory={REPO}", "-C", str(REPO), "ls-files", "-z", "--cached",
         "--others", "--exclude-standard"], capture_output=True, check=True).stdout
    checkout = tmp_path / "checkout"
    for name in filter(None, listed.decode().split("\0")):
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    before = sorted(p.name for p in checkout.iterdir())

    out = ok(run(INSTALL_VENV, "--root", root, checkout=checkout))
    program = checkout / ".venv/bin/orproxy"
    assert f"ExecStart={program} --config" in (root / UNIT).read_text()
    assert program.is_file() and os.access(program, os.X_OK)
    version = "import importlib.metadata as m; print(m.version('orproxy'))"
    assert ok(subprocess.run([str(checkout / ".venv/bin/python"), "-I", "-c", version],
                             capture_output=True, text=True)).strip()
    assert sorted(p.name for p in checkout.iterdir()) == sorted([*before, ".venv"])
    assert "copying the source files" in out
    assert "already installed" in ok(run(INSTALL_VENV, "--root", root, checkout=checkout))


# ------------------------------------------------------------------------ shellcheck

def test_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, *(str(REPO / s) for s in SCRIPTS)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
