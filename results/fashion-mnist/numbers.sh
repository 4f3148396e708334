# Sourced by run_study.sh and finetune_lr_validation.sh.
number() {  # NUMBER, LOWEST (0: 0 allowed; above: above 0), written as printf %g writes it (1e-4 and 0.0001 name one folder)
  [[ "$1" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] &&
    LC_ALL=C awk -v x="$1" -v lowest="$2" 'BEGIN { exit !(lowest == "0" ? x >= 0 : x > 0) }' && LC_ALL=C printf %g "$1"
}
