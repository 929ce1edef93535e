#!/usr/bin/env bash
# Create one isolated virtual environment per peer library under benchmarks/.envs/<peer>.
#
#   bash benchmarks/envs.sh                 # all peers
#   bash benchmarks/envs.sh torchopt jaxopt # only these
#   FORCE=1 bash benchmarks/envs.sh higher  # rebuild even if the stamp exists
#
# Idempotent: an env whose stamp file benchmarks/.envs/<peer>/.installed exists is skipped.
# A failed install does not abort the others: it is recorded in benchmarks/.envs/<peer>.failed
# (the failing command and the tail of pip's output), and the script exits 0 once every peer
# has been tried (non-zero only on a usage error). A summary of all peers goes to stdout and to
# benchmarks/.envs/STATUS.
#
# torch peers get torch==2.13.0 (the CPU wheel from the local find-links) FIRST, so that a peer's
# bare "torch" requirement is already satisfied and pip never fetches a multi-GB CUDA build.
# hypertorch (Grazzi et al.) is not on PyPI (the PyPI name belongs to an unrelated hypergraph
# library), so it is deliberately not installed.
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENVS="${ENVS_DIR:-$HERE/.envs}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
ALL_PEERS=(plain torchopt higher betty jaxopt)

mkdir -p "$ENVS"

# pip arguments per peer (after torch for torch peers); "|" separates successive pip calls.
# Override with e.g. PEER_PKGS_jaxopt="numpy jax==0.4.30 jaxlib==0.4.30 jaxopt".
pkgs_for() {
    case "$1" in
        plain) echo "numpy" ;;
        torchopt) echo "numpy torchopt" ;;
        higher) echo "numpy higher" ;;
        # betty-ml 0.2.x declares python_requires<3.11; it is pure Python and works on 3.11. numpy is
        # installed in its own, normal pip call first: under --ignore-requires-python pip would pick
        # the newest numpy sdist (which needs Python >= 3.12) and fail to build it.
        betty) echo "numpy | --ignore-requires-python betty-ml==0.2.*" ;;
        jaxopt) echo "numpy jax jaxlib jaxopt" ;;
        *) return 1 ;;
    esac
}

needs_torch() {
    case "$1" in
        plain | torchopt | higher | betty) return 0 ;;
        *) return 1 ;;
    esac
}

# Import check run after install: proves the peer is usable, not only installed.
check_for() {
    case "$1" in
        plain) echo "import torch, numpy; print('torch', torch.__version__)" ;;
        torchopt) echo "import torch, torchopt; print('torchopt', torchopt.__version__, 'torch', torch.__version__)" ;;
        higher) echo "import torch, higher, importlib.metadata as m; print('higher', m.version('higher'), 'torch', torch.__version__)" ;;
        betty) echo "import torch, betty; from betty.engine import Engine; from betty.problems import ImplicitProblem; import importlib.metadata as m; print('betty-ml', m.version('betty-ml'), 'torch', torch.__version__)" ;;
        jaxopt) echo "import jax, jaxopt, importlib.metadata as m; print('jaxopt', m.version('jaxopt'), 'jax', jax.__version__)" ;;
    esac
}

record_fail() { # peer, step, logfile
    {
        echo "step: $2"
        echo "--- last 40 lines of output ---"
        tail -n 40 "$3"
    } >"$ENVS/$1.failed"
    echo "FAILED  $1 ($2): see $ENVS/$1.failed"
}

install_peer() {
    local peer="$1" env="$ENVS/$1" log="$ENVS/$1.log"
    if [ -f "$env/.installed" ] && [ -z "${FORCE:-}" ]; then
        echo "ok      $peer (already installed: $(cat "$env/.installed"))"
        return 0
    fi
    rm -rf "$env" "$ENVS/$peer.failed"
    : >"$log"
    echo "install $peer ..."
    if ! "$PYTHON" -m venv "$env" >>"$log" 2>&1; then
        record_fail "$peer" "venv" "$log"
        return 0
    fi
    local pip=("$env/bin/python" -m pip install --disable-pip-version-check)
    if needs_torch "$peer"; then
        if ! "${pip[@]}" "$TORCH_SPEC" >>"$log" 2>&1; then
            record_fail "$peer" "pip install $TORCH_SPEC" "$log"
            return 0
        fi
    fi
    local var="PEER_PKGS_$peer" steps step
    steps="${!var:-$(pkgs_for "$peer")}"
    IFS='|' read -r -a step_list <<<"$steps"
    for step in "${step_list[@]}"; do
        # shellcheck disable=SC2086 # word splitting of the package list is intended
        if ! "${pip[@]}" $step >>"$log" 2>&1; then
            record_fail "$peer" "pip install ${step# }" "$log"
            return 0
        fi
    done
    local versions
    if ! versions="$("$env/bin/python" -c "$(check_for "$peer")" 2>>"$log")"; then
        record_fail "$peer" "import check" "$log"
        return 0
    fi
    echo "$versions" >"$env/.installed"
    echo "ok      $peer ($versions)"
}

if [ "$#" -gt 0 ]; then peers=("$@"); else peers=("${ALL_PEERS[@]}"); fi
for p in "${peers[@]}"; do
    if ! pkgs_for "$p" >/dev/null; then
        echo "unknown peer: $p (known: ${ALL_PEERS[*]})" >&2
        exit 2
    fi
done
for p in "${peers[@]}"; do install_peer "$p"; done

# Summary of every peer's state (not only those handled by this run), also kept in .envs/STATUS.
{
    for p in "${ALL_PEERS[@]}"; do
        if [ -f "$ENVS/$p/.installed" ]; then
            echo "$p OK $(cat "$ENVS/$p/.installed")"
        elif [ -f "$ENVS/$p.failed" ]; then
            echo "$p FAILED $(head -n 1 "$ENVS/$p.failed") (details: $ENVS/$p.failed)"
        else
            echo "$p NOT-BUILT"
        fi
    done
    echo "hypertorch UNAVAILABLE not on PyPI (the PyPI package 'hypertorch' is an unrelated library)"
} >"$ENVS/STATUS"
echo "--- status ($ENVS/STATUS) ---"
cat "$ENVS/STATUS"
