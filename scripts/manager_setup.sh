#!/usr/bin/env bash
# Set up (or update) the ImageFleet fleet manager on this machine: the manager's
# counterpart of remote_setup.sh. Idempotent: run it again with a new bundle to update.
#
# Production (root, systemd; what the manager's user data runs):
#   manager_setup.sh --source DIR --config FILE [--region R] [--prefix /opt/imagefleet-manager]
#       [--user imagefleet-manager] [--health-timeout 120]
#   creates a system user, a venv under PREFIX with the manager's requirements, installs
#   the config as /etc/imagefleet/manager.json (root:USER 0640) and the systemd unit
#   imagefleet-manager.service (`python -m fleet run --config ...`, non-root,
#   Restart=always, hardened, the config's state_dir as its StateDirectory, mode 0700),
#   starts it and waits for GET /fleet/ping on the admin port.
#
# Review (no root, nothing changed): --print-unit prints the systemd unit that production
# mode would install for this config, then exits.
#
# Tests (no root, no systemd):
#   manager_setup.sh --no-systemd --prefix DIR --source DIR --config FILE
#       [--venv EXISTING_VENV] [--python PYTHON] [--health-timeout N]
#   installs the code in PREFIX/app, uses EXISTING_VENV as is (no network) or
#   creates PREFIX/venv, starts the manager in the background (PREFIX/manager.pid,
#   PREFIX/manager.log) and waits for /fleet/ping.
#
# SOURCE holds the project's wheel (imagefleet-VERSION-py3-none-any.whl), scripts/ and the
# requirements files (the bundle built by fleet.aws.ssh_bootstrap.build_manager_bundle).
# The wheel is installed, offline and without dependencies, into PREFIX/app (pip
# --target) and kept there: the manager puts it into the workers' bundles as is. Exit codes: 0 answering; 1 failed (the reason is
# on stderr); 2 usage.
set -euo pipefail

source_dir=""
config=""
region=""
prefix=/opt/imagefleet-manager
service_user=imagefleet-manager
python_bin=python3
venv=""
use_systemd=1
print_unit=0
health_timeout=120

setup_name=manager_setup
# die, usage, log, the venv, the readiness wait...: shared with remote_setup.sh.
source "$(dirname "${BASH_SOURCE[0]}")/setup_common.sh"

while (($#)); do
    case "$1" in
        --source) source_dir=${2:?}; shift 2 ;;
        --config) config=${2:?}; shift 2 ;;
        --region) region=${2:?}; shift 2 ;;
        --prefix) prefix=${2:?}; shift 2 ;;
        --user) service_user=${2:?}; shift 2 ;;
        --python) python_bin=${2:?}; shift 2 ;;
        --venv) venv=${2:?}; shift 2 ;;
        --no-systemd) use_systemd=0; shift ;;
        --print-unit) print_unit=1; shift ;;
        --health-timeout) health_timeout=${2:?}; shift 2 ;;
        *) usage "unknown argument '$1'" ;;
    esac
done

[[ -n "$source_dir" ]] || usage "--source DIR is required"
[[ -n "$config" ]] || usage "--config FILE is required (the fleet config)"
[[ -f "$config" ]] || die "no fleet config at $config"
[[ -f "$source_dir/manager-requirements.txt" && -f "$source_dir/requirements.txt" ]] \
    || die "$source_dir does not hold the manager bundle (wheel, requirements files)"
wheel=$(find_wheel "$source_dir")
[[ "$health_timeout" =~ ^[0-9]+$ ]] || usage "--health-timeout must be whole seconds"
[[ -z "$region" || "$region" =~ ^[a-z]{2}(-[a-z]+)+-[0-9]+$ ]] \
    || usage "--region must be a region name like eu-west-1 (got '$region')"
source_dir=$(cd "$source_dir" && pwd)
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")

if ((print_unit)); then
    :
elif ((use_systemd)); then
    ((EUID == 0)) || die "systemd mode must run as root (use sudo), or pass --no-systemd"
else
    mkdir -p "$prefix"
    prefix=$(cd "$prefix" && pwd)
fi

# What the unit and the readiness check need from the config, read by the same
# validation the manager uses (a bad config fails here with the field named).
config_field() {
    local python="$python_bin"
    [[ -x "$venv/bin/python" ]] && python="$venv/bin/python"
    # A pure-Python wheel is a zip archive Python imports from directly: the config is
    # checked with the code about to be installed, before (or without) installing it.
    PYTHONPATH="$wheel" "$python" - "$config" "$1" <<'EOF'
import sys
from fleet.aws.config import ConfigError, load_config
try:
    value = getattr(load_config(sys.argv[1]), sys.argv[2])
except ConfigError as exc:
    sys.exit(f"manager_setup: {exc}")
print("" if value is None else str(value).lower() if isinstance(value, bool) else value)
EOF
}

install_code() {
    local app="$prefix/app" item
    # The wheel brings scripts/remote_setup.sh and setup_common.sh (package data), which
    # the manager bundles for the workers it bootstraps.
    install_wheel_tree "$app.new" "$wheel"
    # Kept next to the code: the workers' bundles carry this wheel, so the manager host
    # needs neither the sources nor setuptools.
    for item in "$wheel" "$source_dir/requirements.txt" "$source_dir/manager-requirements.txt"
    do
        cp "$item" "$app.new/"
    done
    swap_in_tree "$app"
}

wait_for_ping() {
    # Over TLS the manager's certificate is made in memory at start; it writes the public
    # half to state_dir, which this check pins.
    local port tls state_dir url outcome=0
    port=$(config_field admin_port)
    tls=$(config_field admin_tls)
    state_dir=$(config_field state_dir)
    [[ "$tls" != true || -n "$state_dir" ]] \
        || die "admin_tls needs state_dir in the config: the manager writes its certificate there"
    if [[ "$tls" == true ]]; then url="https://127.0.0.1:$port/fleet/ping"
    else url="http://127.0.0.1:$port/fleet/ping"; fi
    wait_until_answers "$url" "$state_dir/admin-cert.pem" "${manager_pid:-}" || outcome=$?
    case "$outcome" in
        0) log "answering: $url" ;;
        1) tail -n 30 "$prefix/manager.log" >&2 || true
           die "the manager exited before answering" ;;
        *) show_log_tail imagefleet-manager.service "$prefix/manager.log"
           die "no answer from $url within ${health_timeout}s" ;;
    esac
}

render_unit() {
    local config_file=$1 state_dir state_lines
    state_dir=$(config_field state_dir)
    # systemd creates the StateDirectory for the service user with mode 0700 and keeps
    # it across restarts and upgrades; anywhere else would be writable only by hand.
    if [[ -z "$state_dir" ]]; then
        state_lines=""
    elif [[ "$state_dir" =~ ^/var/lib/([A-Za-z0-9_.-]+)$ ]]; then
        state_lines="StateDirectory=${BASH_REMATCH[1]}"$'\n'"StateDirectoryMode=0700"
    else
        die "state_dir must be /var/lib/NAME for the systemd service (got '$state_dir')"
    fi
    cat <<EOF
[Unit]
Description=ImageFleet fleet manager
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=$service_user
Group=$service_user
WorkingDirectory=$prefix/app
ExecStart=$venv/bin/python -m fleet run --config $config_file
Environment=PYTHONUNBUFFERED=1
${region:+Environment=AWS_REGION=$region AWS_DEFAULT_REGION=$region}
Restart=always
RestartSec=2
KillSignal=SIGTERM
TimeoutStopSec=30
$state_lines
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
CapabilityBoundingSet=
AmbientCapabilities=
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
EOF
}

setup_systemd() {
    ensure_system_user "$service_user"
    mkdir -p "$prefix" /etc/imagefleet
    # The venv first: its pip installs the wheel.
    ensure_venv "$source_dir/manager-requirements.txt"
    install_code
    local config_file=/etc/imagefleet/manager.json
    local unit=/etc/systemd/system/imagefleet-manager.service new_unit
    new_unit=$(render_unit "$config_file")
    install -o root -g "$service_user" -m 0640 "$config" "$config_file.new"
    mv "$config_file.new" "$config_file"
    if [[ ! -f "$unit" || "$(cat "$unit")" != "$new_unit" ]]; then
        printf '%s\n' "$new_unit" > "$unit.new"
        mv "$unit.new" "$unit"
    fi
    systemctl daemon-reload
    systemctl enable imagefleet-manager.service >/dev/null
    # New code is always installed, so restart; the lease hands over on SIGTERM.
    systemctl restart imagefleet-manager.service
    log "imagefleet-manager.service (re)started"
    wait_for_ping
}

setup_background() {
    ensure_venv "$source_dir/manager-requirements.txt"
    install_code
    stop_pid_file "$prefix/manager.pid" 30 manager
    local state_dir
    state_dir=$(config_field state_dir)
    if [[ -n "$state_dir" ]]; then mkdir -p "$state_dir" && chmod 0700 "$state_dir"; fi
    install -m 0600 "$config" "$prefix/manager.json"
    cd "$prefix/app"
    local -a env_args=(PYTHONUNBUFFERED=1)
    [[ -n "$region" ]] && env_args+=(AWS_REGION="$region" AWS_DEFAULT_REGION="$region")
    # setsid + closed stdio: the manager outlives this session and holds none of its pipes.
    env "${env_args[@]}" setsid "$venv/bin/python" -m fleet run --config "$prefix/manager.json" \
        </dev/null >>"$prefix/manager.log" 2>&1 &
    manager_pid=$!
    echo "$manager_pid" > "$prefix/manager.pid"
    log "started manager pid $manager_pid (log $prefix/manager.log)"
    wait_for_ping
}

if ((print_unit)); then
    [[ -n "$venv" ]] || venv="$prefix/venv"
    render_unit /etc/imagefleet/manager.json
elif ((use_systemd)); then
    setup_systemd
else
    setup_background
fi
