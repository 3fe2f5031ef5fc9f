#!/usr/bin/env bash
# Install orproxy as a systemd service.
#
#   sudo ./service_install.sh        the program in its own venv, /opt/orproxy, built with
#                                    the system Python (/usr/bin/python3) from this checkout
#   sudo ./service_install_venv.sh   the program from your venv: --venv DIR, else
#                                    $VIRTUAL_ENV, else ./.venv, else a new ./.venv
#
# Why a venv in /opt for the system install: Debian's system Python refuses `pip install`
# into itself (PEP 668), and `pip install --prefix` leaves a site-packages directory whose
# name depends on the distribution's Python patches, which the unit would have to put on
# PYTHONPATH. A venv is self-contained: /opt/orproxy/bin/orproxy just works.
#
# Both create the system user orproxy, install the config as /etc/orproxy/config.yml
# (never over an existing one), write /etc/systemd/system/orproxy.service from
# contrib/systemd/orproxy.service.in, check it with systemd-analyze verify, then enable
# and start the service. Running it again is harmless. Run with --help for the options.
set -euo pipefail
umask 022

readonly SERVICE_USER=orproxy
readonly UNIT_NAME=orproxy.service
readonly CONFIG_DIR=/etc/orproxy
readonly CONFIG_FILE=/etc/orproxy/config.yml
readonly UNIT_DIR=/etc/systemd/system
readonly SYSTEM_VENV=/opt/orproxy
# Left in /opt/orproxy so that service_uninstall.sh removes only a venv this script made.
readonly MARKER=.installed-by-orproxy-service-install
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
readonly HERE
readonly TEMPLATE="$HERE/contrib/systemd/orproxy.service.in"

MODE=system          # system: /opt/orproxy; venv: an existing or new venv of the user's
DRY_RUN=0
ROOT=""              # --root DIR: files go under DIR; no user, no systemctl
CONFIG_FROM=""
PYTHON=""
VENV=""
UPGRADE=0
UNIT_CHANGED=0
PROGRAM_CHANGED=0
FROM_EXAMPLE=0
SOURCE=""            # what pip installs: a copy of the checkout's source files
BIN_ABSENT_OK=0      # --root system install: the program is not installed, verify may say so
CLEANUP=()           # temporary directories, removed on exit
trap 'rm -rf -- "${CLEANUP[@]}"' EXIT

usage() {
    cat <<EOF
Usage: sudo ./service_install.sh [OPTIONS]
       sudo ./service_install_venv.sh [OPTIONS] [--venv DIR]

Install orproxy as the systemd service orproxy.service, running as the system user
orproxy with the config /etc/orproxy/config.yml. Running it again is harmless.

service_install.sh installs the program into its own venv, $SYSTEM_VENV, built with the
system Python. service_install_venv.sh runs it from your venv instead: --venv DIR, else
\$VIRTUAL_ENV (sudo drops it: use sudo -E or --venv), else ./.venv, else it creates ./.venv
(as the owner of the checkout) and installs orproxy into it.

The config comes from --config-from FILE, else ./config.yml, else config.yml.example
(then edit it!). An existing /etc/orproxy/config.yml is never overwritten.

Options:
  --dry-run            print every action (commands, and files with their content)
                       without changing anything; needs no root
  --root DIR           install the unit and config under DIR instead of /, for tests and
                       packagers; no user is created, no systemctl is run, and the
                       system install does not build /opt/orproxy (a venv cannot be moved)
  --config-from FILE   the config to install when /etc/orproxy/config.yml does not exist
  --python PATH        the Python that builds the venv (service_install.sh: default
                       /usr/bin/python3; service_install_venv.sh: python3, used only when
                       it creates the venv)
  --venv DIR           (service_install_venv.sh) the venv to run orproxy from; created
                       if missing
  --upgrade            (service_install.sh) reinstall orproxy into /opt/orproxy from this
                       checkout even if it is there, and restart the running service
  -h, --help           this help
EOF
}

say() { printf '%s\n' "$*"; }
step() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

quoted() {
    local out
    printf -v out '%q ' "$@"
    printf '%s' "${out% }"
}

# Print a command, and run it unless --dry-run.
run() {
    if ((DRY_RUN)); then
        say "    would run: $(quoted "$@")"
    else
        say "    + $(quoted "$@")"
        "$@"
    fi
}

skipped() { say "    skipped (--root): $*"; }

# The config holds the keys: no moment where a copy of it is readable by others.
run_private() {
    if ((DRY_RUN)); then
        say "    would run: $(quoted "$@")  (content not shown: it holds keys)"
    else
        say "    + $(quoted "$@")"
        (umask 077 && "$@")
    fi
}

loud() {
    say "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    local line
    for line in "$@"; do say "!! $line"; done
    say "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
}

example_note() {
    loud "$CONFIG_FILE is a copy of config.yml.example: placeholder keys and access key." \
        "Edit it (openrouter.keys, server.access_key), then: sudo systemctl restart orproxy"
}

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

parse_args() {
    while (($#)); do
        case $1 in
            --dry-run) DRY_RUN=1 ;;
            --upgrade) UPGRADE=1 ;;
            --from-venv) MODE=venv ;;  # set by service_install_venv.sh
            --root|--config-from|--python|--venv)
                need_value "$@"
                set_option "$1" "$2"
                shift ;;
            --root=*|--config-from=*|--python=*|--venv=*) set_option "${1%%=*}" "${1#*=}" ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; printf 'error: unknown argument: %s\n' "$1" >&2; exit 2 ;;
        esac
        shift
    done
}

set_option() {
    [[ -n $2 ]] || die "$1 needs a value (see --help)"
    case $1 in
        --root)
            [[ -d $2 ]] || die "--root $2: not a directory"
            ROOT=$(cd "$2" && pwd -P)
            [[ $ROOT != / ]] || ROOT="" ;;
        --config-from)
            [[ -f $2 && -r $2 ]] || die "--config-from $2: not a readable file"
            CONFIG_FROM=$(cd "$(dirname "$2")" && pwd -P)/$(basename "$2") ;;
        --python) PYTHON=$2 ;;
        --venv) MODE=venv; VENV=$2 ;;
    esac
}

check_invocation() {
    if [[ $MODE == venv ]] && ((UPGRADE)); then
        die "--upgrade is for service_install.sh; upgrade your venv with pip, then: sudo systemctl restart orproxy"
    fi
    [[ -f $TEMPLATE ]] || die "unit template not found: $TEMPLATE"
    if ((!DRY_RUN)) && [[ $(id -u) -ne 0 ]]; then
        die "must run as root (sudo), or with --dry-run to see what it would do"
    fi
    if ((DRY_RUN)); then
        say "dry run: nothing is changed; these are the actions it would take."
    fi
}

# A systemd command line needs quoting for blanks, "%" and more: refuse such paths
# rather than escape them.
check_unit_path() {
    local LC_ALL=C  # ranges are ASCII ranges, whatever the caller's locale
    [[ $1 =~ ^/[A-Za-z0-9._/+@-]+$ ]] ||
        die "path not usable in a systemd unit (only letters, digits and ._/+@- please): $1"
}

ensure_user() {
    step "system user $SERVICE_USER"
    if [[ -n $ROOT ]]; then
        skipped "create the system user $SERVICE_USER (the package's own scripts must do it)"
    elif getent passwd "$SERVICE_USER" >/dev/null; then
        say "    already exists"
    else
        local nologin=/usr/sbin/nologin group_opt=(--user-group)
        [[ -x $nologin ]] || nologin=/sbin/nologin
        [[ -x $nologin ]] || nologin=/bin/false
        if getent group "$SERVICE_USER" >/dev/null; then group_opt=(--gid "$SERVICE_USER"); fi
        run useradd --system "${group_opt[@]}" --no-create-home --home-dir /nonexistent \
            --shell "$nologin" --comment "orproxy service" "$SERVICE_USER"
    fi
}

check_python() {
    local python=$1
    command -v "$python" >/dev/null || die "Python not found: $python (pass --python PATH)"
    "$python" -B -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "orproxy needs Python >= 3.11: $python is older (pass --python PATH)"
}

# pip builds in the source tree (build/, *.egg-info): under sudo that leaves root-owned
# files in a user's checkout, and a stale build/ can put modules deleted since into the
# wheel. So pip gets a copy of the checkout's source files (tracked or not, less what git
# ignores). Sets SOURCE; outside a git checkout it is the checkout itself.
copy_source() {
    SOURCE=$HERE
    local git=(git -c "safe.directory=$HERE" -C "$HERE")
    if ! command -v git >/dev/null || ! "${git[@]}" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        say "    note: not a git checkout: pip builds in $HERE itself"
        return
    fi
    if ((DRY_RUN)); then
        SOURCE=SOURCE_COPY
        say "    would copy the source files of $HERE (git ls-files) to a temporary directory $SOURCE"
        return
    fi
    SOURCE=$(mktemp -d)
    CLEANUP+=("$SOURCE")
    chmod 0755 "$SOURCE"  # the venv's owner builds from it too
    say "    + copying the source files of $HERE to $SOURCE"
    "${git[@]}" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' file; do
            if [[ -e $HERE/$file ]]; then printf '%s\0' "$file"; fi  # skip deleted files
        done |
        tar -C "$HERE" --null --no-recursion -T - -cf - | tar -C "$SOURCE" -xf -
}

# Sets VENV and BIN for the system install.
install_system_program() {
    VENV=$SYSTEM_VENV
    BIN=$VENV/bin/orproxy
    step "program in $VENV"
    if [[ -n $ROOT ]]; then
        skipped "building $VENV (a venv cannot be moved: on the target run" \
            "python3 -m venv $VENV && $VENV/bin/pip install <orproxy source>)"
        BIN_ABSENT_OK=1
        return
    fi
    if [[ -x $BIN ]] && ((!UPGRADE)); then
        say "    already installed (--upgrade reinstalls it from $HERE)"
        return
    fi
    PYTHON=${PYTHON:-/usr/bin/python3}
    check_python "$PYTHON"
    if [[ ! -x $VENV/bin/python ]]; then
        [[ ! -e $VENV ]] || die "$VENV exists but is not a venv: move it away first"
        run "$PYTHON" -m venv "$VENV"
        run touch "$VENV/$MARKER"
    fi
    copy_source
    run "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input "$SOURCE"
    PROGRAM_CHANGED=1
}

# Run a command as the owner of PATH (a user's venv or checkout), so that it stays theirs.
as_owner_of() {
    local path=$1 owner home
    shift
    owner=$(stat -c %U "$path")
    if [[ $(id -u) -eq 0 && $owner != root && $owner != UNKNOWN ]]; then
        home=$(getent passwd "$owner" | cut -d: -f6)
        run runuser -u "$owner" -- env HOME="${home:-/}" "$@"
    else
        run "$@"
    fi
}

# Sets VENV and BIN for the venv install.
install_venv_program() {
    if [[ -z $VENV ]]; then
        if [[ -n ${VIRTUAL_ENV:-} ]]; then
            VENV=$VIRTUAL_ENV
            [[ -d $VENV ]] || die "\$VIRTUAL_ENV is $VENV, which does not exist"
        else
            VENV=$HERE/.venv
        fi
    fi
    [[ $VENV == /* ]] || VENV=$PWD/$VENV
    step "program in the venv $VENV"
    check_unit_path "$VENV/bin/orproxy"  # before anything is built there
    if [[ ! -e $VENV ]]; then
        local python=${PYTHON:-python3} parent
        check_python "$python"
        parent=$(dirname "$VENV")
        [[ -d $parent ]] || die "cannot create $VENV: $parent does not exist"
        as_owner_of "$parent" "$python" -m venv "$VENV"
    elif [[ ! -x $VENV/bin/python ]]; then
        die "$VENV is not a venv (no bin/python)"
    fi
    VENV=$(cd "$VENV" 2>/dev/null && pwd -P || printf '%s' "$VENV")
    BIN=$VENV/bin/orproxy
    if [[ -x $BIN ]]; then
        say "    already installed (to upgrade: pip install into it, then sudo systemctl restart orproxy)"
    else
        local owner_path=$VENV
        [[ -e $VENV ]] || owner_path=$(dirname "$VENV")
        copy_source
        as_owner_of "$owner_path" "$VENV/bin/python" -m pip install --disable-pip-version-check \
            --no-input "$SOURCE"
        PROGRAM_CHANGED=1
    fi
}

under_home() {
    case $1 in
        /home|/home/*|/root|/root/*|/run/user|/run/user/*) return 0 ;;
    esac
    return 1
}

# What the service needs to read: the interpreter, its standard library, and the orproxy
# package (an editable install lives in its checkout). Printed one path a line.
readonly PROBE='import importlib.util, os, sys
spec = importlib.util.find_spec("orproxy")
print(os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix), sep="\n")
if spec and spec.origin:
    print(os.path.realpath(spec.origin))'

# ProtectHome=yes hides /home, /root and /run/user from the service: if any of that lives
# there, the service could not even start. read-only keeps the rest of the sandbox and
# still forbids writing there.
choose_protect_home() {
    local paths=("$VENV") python=$VENV/bin/python path probed=()
    if [[ ! -x $python ]]; then
        python=${PYTHON:-python3}  # the venv is not built yet: the one that would build it
    fi
    if [[ $MODE == system && -n $ROOT ]]; then
        :  # the target's venv is not built on this machine: nothing here to look at
    elif command -v "$python" >/dev/null; then
        # -I: the venv's own view, not an orproxy in the current directory.
        mapfile -t probed < <("$python" -I -B -c "$PROBE" 2>/dev/null || true)
        paths+=("${probed[@]}")
    fi
    PROTECT_HOME=yes
    for path in "${paths[@]}"; do
        if under_home "$path"; then
            PROTECT_HOME=read-only
            say "    note: $path is under /home, /root or /run/user: the unit uses" \
                "ProtectHome=read-only instead of yes, which would hide it from the service"
            return
        fi
    done
}

install_config() {
    local dir=$ROOT$CONFIG_DIR dest=$ROOT$CONFIG_FILE src=$CONFIG_FROM owner=()
    step "config $CONFIG_FILE"
    if [[ -n $ROOT ]]; then
        skipped "ownership root:$SERVICE_USER (no user under --root; the files are the caller's)"
    else
        owner=(-o root -g "$SERVICE_USER")
    fi
    if [[ -d $dir ]]; then
        say "    $CONFIG_DIR already exists"
    else
        run install -d -m 0750 "${owner[@]}" "$dir"
    fi
    if [[ -e $dest ]]; then
        say "    already exists: left unchanged"
        fix_config_mode "$dest"
        if cmp -s "$dest" "$HERE/config.yml.example"; then FROM_EXAMPLE=1; fi
        return
    fi
    if [[ -z $src ]]; then
        src=$HERE/config.yml
        if [[ ! -f $src ]]; then
            src=$HERE/config.yml.example
            FROM_EXAMPLE=1
        fi
    fi
    run_private install -m 0640 "${owner[@]}" "$src" "$dest"
}

fix_config_mode() {
    local dest=$1 mode group
    mode=$(stat -c %a "$dest")
    [[ $mode == 640 ]] || run chmod 0640 "$dest"
    if [[ -z $ROOT ]]; then
        group=$(stat -c %G "$dest")
        [[ $group == "$SERVICE_USER" ]] || run chgrp "$SERVICE_USER" "$dest"
    fi
}

# The service user must be able to run the program and read the config outside the
# sandbox too: a venv in a home directory that others cannot enter fails here, not at
# every restart of the service.
check_service_user_access() {
    step "checks as the user $SERVICE_USER"
    if [[ -n $ROOT ]]; then
        skipped "running $BIN as $SERVICE_USER"
        return
    fi
    local rc=0
    run runuser -u "$SERVICE_USER" -- "$BIN" --version || rc=$?
    if ((rc)); then
        die "$BIN --version fails as the user $SERVICE_USER (exit status $rc, output above)." \
            "If it is a permission problem: a venv in a home directory needs every directory" \
            "on the way open to others (chmod o+x), or use service_install.sh, which installs" \
            "into $SYSTEM_VENV"
    fi
    if ! run runuser -u "$SERVICE_USER" -- "$BIN" --config "$CONFIG_FILE" --check; then
        loud "orproxy --check rejects $CONFIG_FILE (see above): the service will fail" \
            "until it is fixed. Then: sudo systemctl restart orproxy"
    fi
}

render_unit() {
    local template unit
    template=$(<"$TEMPLATE")
    unit=${template//@ORPROXY_BIN@/"$BIN"}
    unit=${unit//@PROTECT_HOME@/"$PROTECT_HOME"}
    [[ ! $unit =~ @[A-Z_]+@ ]] || die "unit template has a placeholder this script does not fill: ${BASH_REMATCH[0]}"
    printf '%s\n' "$unit"
}

# systemd-analyze verify exits 0 on unknown keys and bad values: its messages about our
# unit are what count.
verify_unit() {
    local file=$1 out rc=0 line problems=() tolerated=0
    if ! command -v systemd-analyze >/dev/null; then
        say "    note: systemd-analyze not found: the unit is not verified (it comes with systemd)"
        return
    fi
    out=$(systemd-analyze verify --man=no "$file" 2>&1) || rc=$?
    while IFS= read -r line; do
        [[ -n $line ]] || continue
        if ((BIN_ABSENT_OK)) && [[ $line == "$UNIT_NAME: Command $BIN is not executable: No such file or directory" ]]; then
            tolerated=1
            say "    note: verify says $BIN is missing: expected under --root"
        elif [[ $line == *"$UNIT_NAME"* ]]; then
            problems+=("$line")
        else
            say "    systemd-analyze (not about orproxy): $line"
        fi
    done <<<"$out"
    if ((${#problems[@]})) || ((rc != 0 && !tolerated)); then
        if ((${#problems[@]})); then printf '    %s\n' "${problems[@]}" >&2; fi
        die "systemd-analyze verify rejects the unit (exit status $rc, messages above); nothing was installed"
    fi
    say "    systemd-analyze verify: ok"
}

install_unit() {
    local dest=$ROOT$UNIT_DIR/$UNIT_NAME unit staging
    step "unit $UNIT_DIR/$UNIT_NAME"
    unit=$(render_unit)
    if [[ -f $dest ]] && [[ $(<"$dest") == "$unit" ]]; then
        say "    already up to date"
        if ((!DRY_RUN)); then verify_unit "$dest"; fi
        return
    fi
    [[ ! -e $dest ]] || say "    differs from what this script writes: replacing it (local changes belong in a drop-in: systemctl edit orproxy)"
    if ((DRY_RUN)); then
        say "    would write $dest (mode 0644):"
        say "    ----8<----"
        printf '%s\n' "$unit"
        say "    ----8<----"
        say "    would run: systemd-analyze verify --man=no $dest"
        UNIT_CHANGED=1
        return
    fi
    staging=$(mktemp -d)
    CLEANUP+=("$staging")
    printf '%s\n' "$unit" >"$staging/$UNIT_NAME"
    verify_unit "$staging/$UNIT_NAME"
    [[ -d $ROOT$UNIT_DIR ]] || run install -d -m 0755 "$ROOT$UNIT_DIR"
    run install -m 0644 "$staging/$UNIT_NAME" "$dest"
    UNIT_CHANGED=1
}

systemd_running() { [[ -d /run/systemd/system ]]; }

start_service() {
    step "service $UNIT_NAME"
    if [[ -n $ROOT ]]; then
        skipped "systemctl daemon-reload; systemctl enable --now $UNIT_NAME"
        return
    fi
    if ! systemd_running; then
        say "    note: systemd is not running here (no /run/systemd/system): skipped" \
            "systemctl daemon-reload and enable --now $UNIT_NAME; run them once it is"
        return
    fi
    local was_active=0
    run systemctl daemon-reload
    if systemctl is-active --quiet "$UNIT_NAME"; then was_active=1; fi
    if ((was_active)) && systemctl is-enabled --quiet "$UNIT_NAME"; then
        say "    already enabled and running"
    else
        run systemctl enable --now "$UNIT_NAME"
    fi
    if ((was_active && (UNIT_CHANGED || PROGRAM_CHANGED))); then
        say "    the unit or the program changed: restarting"
        run systemctl try-restart "$UNIT_NAME"
    fi
}

main() {
    parse_args "$@"
    check_invocation
    ensure_user
    if [[ $MODE == system ]]; then install_system_program; else install_venv_program; fi
    check_unit_path "$BIN"  # again: the venv's real path, links resolved
    choose_protect_home
    install_config
    check_service_user_access
    install_unit
    start_service
    step "done"
    if ((FROM_EXAMPLE)); then example_note; fi
    say "status: sudo systemctl status orproxy    logs: sudo journalctl -u orproxy -f"
}

main "$@"
