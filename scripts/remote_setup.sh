#!/usr/bin/env bash
# Set up (or update) an ImageFleet processing server on this machine. Idempotent: run it
# again with a new bundle to update the code; unchanged requirements are not reinstalled.
#
# Production (root, systemd; what the SSH bootstrap and the user-data script run):
#   remote_setup.sh --source DIR --storage s3://BUCKET/results --region eu-west-1 \
#       [--port 8080] [--host 0.0.0.0] [--prefix /opt/imagefleet] [--user imagefleet] \
#       [--instance-id ID] [--health-timeout 180] [--token-ssm-parameter NAME]
#   creates a system user, a venv under PREFIX, an environment file and a systemd unit
#   (non-root, Restart=always), starts it and waits for http://127.0.0.1:PORT/health.
#
# Tests (no root, no systemd):
#   remote_setup.sh --no-systemd --prefix DIR --source DIR [--venv EXISTING_VENV] \
#       [--python PYTHON] [--port PORT] [--storage LOCATION]
#   installs the code in PREFIX/app, uses EXISTING_VENV as is (no network) or
#   creates PREFIX/venv, starts `python -m server` in the background (PREFIX/server.pid,
#   PREFIX/server.log) and waits for /health.
#
# --token-ssm-parameter NAME: the server requires the API token held in that SSM
# SecureString and reads it itself at start and every minute (instance role
# credentials); only the name passes through here, never the value.
#
# SOURCE holds the project's wheel (imagefleet-VERSION-py3-none-any.whl), requirements.txt
# and scripts/ (the bundle built by fleet/aws/ssh_bootstrap.py). The venv gets the
# third-party requirements; the wheel is installed, offline and without dependencies,
# into PREFIX/app (pip --target), which the server runs from. Exit codes: 0 healthy;
# 1 failed (the reason is on stderr); 2 usage.
set -euo pipefail

source_dir=""
storage=""
region=""
port=8080
host=127.0.0.1
prefix=/opt/imagefleet
service_user=imagefleet
instance_id=""
python_bin=python3
venv=""
use_systemd=1
health_timeout=180
token_parameter=""

setup_name=remote_setup
# die, usage, log, the venv, the readiness wait...: shared with manager_setup.sh.
source "$(dirname "${BASH_SOURCE[0]}")/setup_common.sh"

while (($#)); do
    case "$1" in
        --source) source_dir=${2:?}; shift 2 ;;
        --storage) storage=${2:?}; shift 2 ;;
        --region) region=${2:?}; shift 2 ;;
        --port) port=${2:?}; shift 2 ;;
        --host) host=${2:?}; shift 2 ;;
        --prefix) prefix=${2:?}; shift 2 ;;
        --user) service_user=${2:?}; shift 2 ;;
        --instance-id) instance_id=${2:?}; shift 2 ;;
        --python) python_bin=${2:?}; shift 2 ;;
        --venv) venv=${2:?}; shift 2 ;;
        --no-systemd) use_systemd=0; shift ;;
        --health-timeout) health_timeout=${2:?}; shift 2 ;;
        --token-ssm-parameter) token_parameter=${2:?}; shift 2 ;;
        *) usage "unknown argument '$1'" ;;
    esac
done

[[ -n "$source_dir" ]] || usage "--source DIR is required"
wheel=$(find_wheel "$source_dir")
[[ "$port" =~ ^[0-9]+$ ]] && ((port >= 1 && port <= 65535)) \
    || usage "--port must be 1..65535 (got '$port')"
[[ "$health_timeout" =~ ^[0-9]+$ ]] || usage "--health-timeout must be whole seconds"
[[ -z "$token_parameter" || "$token_parameter" =~ ^/[A-Za-z0-9_./-]+$ ]] \
    || usage "--token-ssm-parameter must be a parameter path like /imagefleet/NAME/api-token"
source_dir=$(cd "$source_dir" && pwd)

if ((use_systemd)); then
    ((EUID == 0)) || die "systemd mode must run as root (use sudo), or pass --no-systemd"
    [[ "$storage" == s3://* ]] || usage "--storage s3://BUCKET/PREFIX is required in systemd mode"
    [[ -n "$region" ]] || usage "--region is required in systemd mode"
else
    mkdir -p "$prefix"
    prefix=$(cd "$prefix" && pwd)
    [[ -n "$storage" ]] || storage="$prefix/storage"
fi

install_code() {
    local app="$prefix/app"
    install_wheel_tree "$app.new" "$wheel"
    cp "$source_dir/requirements.txt" "$app.new/requirements.txt"
    swap_in_tree "$app"
}

wait_for_health() {
    # The server needs a moment to import OpenCV.
    local url="http://127.0.0.1:$port/health" outcome=0
    wait_until_answers "$url" "" "${server_pid:-}" || outcome=$?
    case "$outcome" in
        0) log "healthy: $url" ;;
        1) tail -n 30 "$prefix/server.log" >&2 || true
           die "server exited before becoming healthy" ;;
        *) show_log_tail imagefleet.service "$prefix/server.log"
           die "no healthy answer from $url within ${health_timeout}s" ;;
    esac
}

imds_instance_id() {
    local token
    token=$(curl -fsS -m 2 -X PUT http://169.254.169.254/latest/api/token \
        -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' 2>/dev/null) || return 0
    curl -fsS -m 2 -H "X-aws-ec2-metadata-token: $token" \
        http://169.254.169.254/latest/meta-data/instance-id 2>/dev/null || true
}

setup_systemd() {
    ensure_system_user "$service_user"
    mkdir -p "$prefix" /etc/imagefleet
    # The venv first: its pip installs the wheel.
    ensure_venv "$source_dir/requirements.txt" apt
    install_code
    [[ -n "$instance_id" ]] || instance_id=$(imds_instance_id)
    local env_file=/etc/imagefleet/server.env unit=/etc/systemd/system/imagefleet.service
    local new_env new_unit changed=0
    new_env=$(cat <<EOF
IMAGEFLEET_STORAGE=$storage
IMAGEFLEET_HOST=$host
IMAGEFLEET_PORT=$port
IMAGEFLEET_INSTANCE_ID=${instance_id:-$(hostname)}
IMAGEFLEET_WORKERS=$(nproc)
AWS_REGION=$region
AWS_DEFAULT_REGION=$region
${token_parameter:+IMAGEFLEET_TOKEN_SSM_PARAMETER=$token_parameter}
EOF
)
    new_unit=$(cat <<EOF
[Unit]
Description=ImageFleet processing server
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=$service_user
Group=$service_user
WorkingDirectory=$prefix/app
EnvironmentFile=$env_file
ExecStart=$venv/bin/python -m server
Restart=always
RestartSec=1
KillSignal=SIGTERM
# SIGTERM to the supervisor only, which passes it on once: a worker signalled twice
# quits without draining. Whatever is left after the timeout gets SIGKILL.
KillMode=mixed
TimeoutStopSec=60
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
EOF
)
    if [[ ! -f "$env_file" || "$(cat "$env_file")" != "$new_env" ]]; then
        (umask 077; printf '%s\n' "$new_env" > "$env_file.new")
        chown root:"$service_user" "$env_file.new"
        chmod 0640 "$env_file.new"
        mv "$env_file.new" "$env_file"
        changed=1
    fi
    if [[ ! -f "$unit" || "$(cat "$unit")" != "$new_unit" ]]; then
        printf '%s\n' "$new_unit" > "$unit.new"
        mv "$unit.new" "$unit"
        changed=1
    fi
    systemctl daemon-reload
    systemctl enable imagefleet.service >/dev/null
    # New code is always installed, so restart; the unit drains on SIGTERM.
    systemctl restart imagefleet.service
    log "imagefleet.service (re)started (config changed: $changed)"
    wait_for_health
}

setup_background() {
    ensure_venv "$source_dir/requirements.txt" apt
    install_code
    stop_pid_file "$prefix/server.pid" 60 server
    cd "$prefix/app"
    local -a env_args=(IMAGEFLEET_STORAGE="$storage" IMAGEFLEET_HOST="$host"
                       IMAGEFLEET_PORT="$port")
    [[ -n "$instance_id" ]] && env_args+=(IMAGEFLEET_INSTANCE_ID="$instance_id")
    [[ -n "$region" ]] && env_args+=(AWS_REGION="$region" AWS_DEFAULT_REGION="$region")
    [[ -n "$token_parameter" ]] && env_args+=(IMAGEFLEET_TOKEN_SSM_PARAMETER="$token_parameter")
    # setsid + closed stdio: the server outlives this (SSH) session and does not hold
    # its channel open.
    env "${env_args[@]}" setsid "$venv/bin/python" -m server \
        </dev/null >>"$prefix/server.log" 2>&1 &
    server_pid=$!
    echo "$server_pid" > "$prefix/server.pid"
    log "started server pid $server_pid (log $prefix/server.log)"
    wait_for_health
}

if ((use_systemd)); then
    setup_systemd
else
    setup_background
fi
