#!/usr/bin/env bash
# Remove the orproxy systemd service that service_install.sh or service_install_venv.sh
# installed: stop and disable it, remove the unit and the /opt/orproxy venv that
# service_install.sh built. The config (/etc/orproxy, it holds the keys) and the state
# (/var/lib/orproxy) stay unless --purge, which removes them and the user orproxy too.
# A venv of yours is never touched. Running it again is harmless. See --help.
set -euo pipefail
umask 022

readonly SERVICE_USER=orproxy
readonly UNIT_NAME=orproxy.service
readonly UNIT_DIR=/etc/systemd/system
readonly CONFIG_DIR=/etc/orproxy
readonly STATE_DIR=/var/lib/orproxy
readonly SYSTEM_VENV=/opt/orproxy
readonly MARKER=.installed-by-orproxy-service-install

DRY_RUN=0
ROOT=""
PURGE=0

usage() {
    cat <<EOF
Usage: sudo ./service_uninstall.sh [--purge] [--dry-run] [--root DIR]

Stop and disable orproxy.service, remove its unit, and remove $SYSTEM_VENV if
service_install.sh built it. Keeps $CONFIG_DIR and $STATE_DIR. Running it again is harmless.

Options:
  --purge       also remove $CONFIG_DIR (config and keys), $STATE_DIR and the user orproxy
  --dry-run     print every action without changing anything; needs no root
  --root DIR    act on files under DIR instead of /; no systemctl, no userdel
  -h, --help    this help
EOF
}

say() { printf '%s\n' "$*"; }
step() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
skipped() { say "    skipped (--root): $*"; }

quoted() {
    local out
    printf -v out '%q ' "$@"
    printf '%s' "${out% }"
}

run() {
    if ((DRY_RUN)); then
        say "    would run: $(quoted "$@")"
    else
        say "    + $(quoted "$@")"
        "$@"
    fi
}

parse_args() {
    while (($#)); do
        case $1 in
            --purge) PURGE=1 ;;
            --dry-run) DRY_RUN=1 ;;
            --root|--root=*)
                local dir
                if [[ $1 == --root ]]; then
                    [[ $# -ge 2 ]] || die "--root needs a value (see --help)"
                    dir=$2
                    shift
                else
                    dir=${1#*=}
                fi
                [[ -n $dir && -d $dir ]] || die "--root $dir: not a directory"
                ROOT=$(cd "$dir" && pwd -P)
                [[ $ROOT != / ]] || ROOT="" ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; printf 'error: unknown argument: %s\n' "$1" >&2; exit 2 ;;
        esac
        shift
    done
    if ((!DRY_RUN)) && [[ $(id -u) -ne 0 ]]; then
        die "must run as root (sudo), or with --dry-run to see what it would do"
    fi
    if ((DRY_RUN)); then
        say "dry run: nothing is changed; these are the actions it would take."
    fi
}

# systemctl only where it means something: not under --root, not without systemd.
systemctl_or_skip() {
    if [[ -n $ROOT ]]; then
        skipped "systemctl $*"
    elif [[ ! -d /run/systemd/system ]]; then
        say "    note: systemd is not running here: skipped systemctl $*"
    else
        run systemctl "$@"
    fi
}

remove_unit() {
    local unit=$ROOT$UNIT_DIR/$UNIT_NAME wants=$ROOT$UNIT_DIR/multi-user.target.wants/$UNIT_NAME
    step "unit $UNIT_DIR/$UNIT_NAME"
    if [[ ! -e $unit && ! -L $unit ]]; then
        say "    already removed"
    else
        systemctl_or_skip stop "$UNIT_NAME"
        systemctl_or_skip disable "$UNIT_NAME"
        run rm -f -- "$unit"
        systemctl_or_skip daemon-reload
    fi
    # Left behind when the unit was deleted by hand, or systemctl could not run.
    if [[ -L $wants ]]; then run rm -f -- "$wants"; fi
}

remove_program() {
    local venv=$ROOT$SYSTEM_VENV
    step "program in $SYSTEM_VENV"
    if [[ -f $venv/$MARKER ]]; then
        run rm -rf -- "$venv"
    elif [[ -e $venv ]]; then
        say "    left in place: service_install.sh did not build it"
    else
        say "    already removed (a venv of yours, used by service_install_venv.sh, is kept)"
    fi
}

remove_dir_or_keep() {
    local dir=$1 what=$2
    step "$what $dir"
    if ((!PURGE)); then
        if [[ -e $ROOT$dir ]]; then say "    kept (--purge removes it)"; else say "    not present"; fi
    elif [[ -e $ROOT$dir ]]; then
        run rm -rf -- "$ROOT$dir"
    else
        say "    already removed"
    fi
}

remove_user() {
    step "system user $SERVICE_USER"
    if ((!PURGE)); then
        say "    kept (--purge removes it)"
    elif [[ -n $ROOT ]]; then
        skipped "userdel $SERVICE_USER"
    elif getent passwd "$SERVICE_USER" >/dev/null; then
        run userdel "$SERVICE_USER"
        # userdel removes the user's own group only where USERGROUPS_ENAB says so.
        if ((DRY_RUN)); then
            say "    would run: groupdel $SERVICE_USER  (if userdel left the group)"
        elif getent group "$SERVICE_USER" >/dev/null; then
            run groupdel "$SERVICE_USER"
        fi
    elif getent group "$SERVICE_USER" >/dev/null; then
        run groupdel "$SERVICE_USER"
    else
        say "    already removed"
    fi
}

main() {
    parse_args "$@"
    remove_unit
    remove_program
    remove_dir_or_keep "$CONFIG_DIR" "config"
    remove_dir_or_keep "$STATE_DIR" "state"
    remove_user
    step "done"
}

main "$@"
