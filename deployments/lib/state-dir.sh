# shellcheck shell=bash
# Sourced by the scripts that run as root and keep state in a folder (containers/podman-setup.sh,
# containers/build.sh, deployments/slurm/slurm-up.sh, slurm-down.sh):
#
#   state_dir_problem DIR        why DIR, or a folder above it, could be changed by another user (else nothing)
#   ensure_state_dir DIR MODE VAR  create DIR with MODE, or accept an existing one only when it is safe; exits with
#                                one line naming DIR and VAR (the variable that overrides it) otherwise
#   write_file DEST MODE         stdin -> a new file renamed over DEST (a symlink at DEST is replaced, not followed)
#   pid_from FILE                the PID in FILE when it is a plain number > 1, else fails (never -1, 0, 1)
#   is_process PID NAME          whether PID runs a program called NAME (/proc/PID/comm)
#
# The caller defines die() (prints one line and exits).

# _path_problem PATH LEAF: why PATH (LEAF=1: the state dir itself; 0: a folder above it) is unsafe.
_path_problem() {
    local p=$1 leaf=$2 uid mode
    read -r uid mode < <(stat -c '%u %a' -- "$p" 2>/dev/null) || {
        echo "$p cannot be checked"
        return
    }
    if [[ -L $p ]]; then
        if ((leaf)); then
            echo "$p is a symbolic link"
        elif ((uid != 0 && uid != EUID)); then
            echo "$p is a symbolic link owned by uid $uid"
        fi
        return
    fi
    if [[ ! -d $p ]]; then
        echo "$p is not a folder"
    elif ((leaf && uid != EUID)); then
        echo "$p is owned by uid $uid, not by uid $EUID"
    elif ((!leaf && uid != 0 && uid != EUID)); then
        echo "$p is owned by uid $uid, neither root nor uid $EUID"
    elif (((8#$mode & 8#022) && (leaf || !(8#$mode & 8#1000)))); then
        # a folder above may be shared when sticky (/tmp): others cannot rename what is ours in it
        printf '%s is writable by group or others (mode %04o)\n' "$p" "$((8#$mode & 8#7777))"
    fi
}

state_dir_problem() {
    local dir=$1 path p i last why
    local -a parts
    [[ $dir == /* ]] || {
        echo "$dir is not an absolute path"
        return
    }
    [[ $dir != *$'\n'* ]] || {
        echo "the path contains a newline"
        return
    }
    # the path as given (symlinks on the way included), then the one it resolves to
    for path in "$dir" "$(realpath -m -- "$dir")"; do
        why=$(_path_problem / 0)
        [[ -z $why ]] || {
            echo "$why"
            return
        }
        IFS=/ read -r -a parts <<<"${path#/}"
        last=-1
        for i in "${!parts[@]}"; do [[ -z ${parts[i]} ]] || last=$i; done
        p=""
        for i in "${!parts[@]}"; do
            [[ -n ${parts[i]} ]] || continue
            p="$p/${parts[i]}"
            [[ -e $p || -L $p ]] || break
            why=$(_path_problem "$p" $((i == last)))
            [[ -z $why ]] || {
                echo "$why"
                return
            }
        done
    done
}

ensure_state_dir() {
    local dir=$1 mode=$2 var=$3 why
    why=$(state_dir_problem "$dir")
    if [[ -z $why && ! -e $dir && ! -L $dir ]]; then
        if ! { mkdir -p -- "$(dirname -- "$dir")" && mkdir -m "$mode" -- "$dir" 2>/dev/null; }; then
            die "cannot create state dir $dir (as uid $EUID): create it (mode $mode) or set $var to another folder"
        fi
        why=$(state_dir_problem "$dir") # again: someone may have raced us to the name
    fi
    [[ -z $why ]] ||
        die "unsafe state dir $dir: $why; remove it or set $var to a folder only uid $EUID can change"
    chmod "$mode" -- "$dir"
}

write_file() {
    local dest=$1 mode=$2 tmp
    tmp=$(mktemp -- "$dest.XXXXXX") || return 1
    if cat >"$tmp" && chmod "$mode" -- "$tmp" && mv -fT -- "$tmp" "$dest"; then
        return 0
    fi
    rm -f -- "$tmp"
    return 1
}

pid_from() {
    local pid=""
    [[ -f $1 && ! -L $1 ]] || return 1
    IFS= read -r pid <"$1" || [[ -n $pid ]] || return 1
    pid=${pid%%[[:space:]]}
    [[ $pid =~ ^[1-9][0-9]{0,9}$ ]] && ((pid > 1)) || return 1
    echo "$pid"
}

is_process() {
    local comm=""
    IFS= read -r comm <"/proc/$1/comm" 2>/dev/null
    [[ $comm == "$2" ]]
}
