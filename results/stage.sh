# stage RESULT LOG CHECKPOINT COMMAND...: the step of a study's script. It runs COMMAND (output
# appended to $logs/LOG.log) unless RESULT exists; with --resume when CHECKPOINT ("" for none)
# exists, so a stopped run continues. Sourced by results/*/run_study.sh from the repository root.
stage() {
  local result=$1 log=$2 checkpoint=$3; shift 3
  [ -e "$result" ] && return 0
  echo "$log: running"
  if [ -n "$checkpoint" ] && [ -e "$checkpoint" ]; then set -- "$@" --resume; fi
  "$@" >> "$logs/$log.log" 2>&1
}
