#!/usr/bin/env bash
# The paper's tables: one main.py run per (model, ID set) on the paper's OOD sets, then pipeline.tools.aggregate.
# With --openood, OpenOOD v1.5's ImageNet-1K benchmark instead: one run per model, OpenOOD-shaped tables.
# With --openood-cifar, OpenOOD v1.5's CIFAR-10 and CIFAR-100 benchmarks (or one: --benchmarks) with OpenOOD's
# ResNet-18 checkpoints.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: ./run.sh [options] [-- extra main.py arguments]

Runs main.py once per (model, ID set) with --train-data imagenet1k and the OOD sets
inaturalist sun places textures openimage-o (plus imagenet-o for vit-b16-swag-e2e-v1, the paper's ViT
setting), writing OUTPUT_ROOT/<model>/<ID set>/results.csv,
then prints the paper's tables with `python -m pipeline.tools.aggregate OUTPUT_ROOT --ci` (each cell with its
bootstrap interval).
With --openood: one run per model of configs/experiments/openood-v1.5-imagenet.yaml (OpenOOD v1.5's
ImageNet-1K lists; ID sets are fixed by it) into OUTPUT_ROOT/<model>/openood-v1.5-imagenet/, then
`python -m pipeline.tools.aggregate OUTPUT_ROOT --openood --ci`.
With --openood-cifar: for each of OpenOOD v1.5's CIFAR-10 and CIFAR-100 benchmarks (--benchmarks picks
them) and each of OpenOOD's three ResNet-18 checkpoints (s0 s1 s2), the experiments openood-v1.5-cifar<N>.yaml
(the paper's settings, every detector) and openood-v1.5-cifar<N>-nnguide.yaml (OpenOOD's own NNGuide) into
OUTPUT_ROOT/openood-resnet18-cifar<N>/<s>/{paper-settings,openood-nnguide}/, then
`python -m pipeline.tools.aggregate OUTPUT_ROOT --openood --ci`: mean ± std over the checkpoints. --models, --id-sets
and --detectors do not apply; the checkpoints are looked up under pretrained_models/ as OpenOOD's zips
unpack them (see configs/models/openood-resnet18-cifar10.yaml).

Options (each also read from the environment variable in brackets):
  --models "a b"       backbones            [MODELS]
                       (default: resnet50-supcon resnet50-react regnet-y-16gf-swag-e2e-v1
                        vit-b16-swag-e2e-v1 mobilenet-v2)
  --id-sets "a b"      ID test sets         [ID_SETS]
                       (default: imagenet1k imagenet1k-v2-a imagenet1k-v2-b imagenet1k-v2-c)
  --detectors "a b"    detectors            [DETECTORS]
                       (default: nnguide knn energy msp maxlogit kl vim mahalanobis ssd;
                        nnguide-vim is added for vit-b16-swag-e2e-v1)
  --data-root DIR      datasets folder      [DATA_ROOT]   (default: ~/datasets)
  --output-root DIR    results folder       [OUTPUT_ROOT] (default: logs/paper; logs/openood with --openood,
                                                          logs/openood-cifar with --openood-cifar)
  --openood            OpenOOD v1.5's ImageNet-1K benchmark instead of the paper's loop
  --openood-cifar      OpenOOD v1.5's CIFAR-10 and CIFAR-100 benchmarks, three checkpoints each
  --benchmarks "a b"   CIFAR benchmarks     [BENCHMARKS]
                       (with --openood-cifar only; default: cifar10 cifar100)
  --aggregate-only     skip the runs, only print the tables
  --keep-going         run every pair even if one fails; list the failures and exit non-zero
  -h, --help           this help
  [PYTHON] chooses the interpreter (default: python).
  [LAUNCHER] runs main.py (default: $PYTHON), e.g. LAUNCHER="torchrun --standalone --nproc_per_node=8"

Example: MODELS=resnet50-react ID_SETS=imagenet1k ./run.sh -- --batch-size 128 --num-workers 16
EOF
}

die() {
    echo "run.sh: $1" >&2
    exit 2
}

absolute() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

MODELS="${MODELS:-resnet50-supcon resnet50-react regnet-y-16gf-swag-e2e-v1 vit-b16-swag-e2e-v1 mobilenet-v2}"
ID_SETS="${ID_SETS:-imagenet1k imagenet1k-v2-a imagenet1k-v2-b imagenet1k-v2-c}"
DETECTORS="${DETECTORS:-nnguide knn energy msp maxlogit kl vim mahalanobis ssd}"
DATA_ROOT="${DATA_ROOT:-$HOME/datasets}"
OUTPUT_ROOT="${OUTPUT_ROOT:-}"
PYTHON="${PYTHON:-python}"
read -r -a launcher <<<"${LAUNCHER:-$PYTHON}"  # may be several words, e.g. torchrun and its options
OOD_SETS=(inaturalist sun places textures openimage-o)
OPENOOD_EXPERIMENT=configs/experiments/openood-v1.5-imagenet.yaml
OPENOOD_CIFAR_BENCHMARKS=(cifar10 cifar100)
BENCHMARKS="${BENCHMARKS:-${OPENOOD_CIFAR_BENCHMARKS[*]}}"
OPENOOD_CIFAR_CHECKPOINTS=(s0 s1 s2)  # OpenOOD's three training runs, folders beside each other in its zips
aggregate_only=0
openood=0
openood_cifar=0
keep_going=0
benchmarks_given=0
extra_args=()

while (($# > 0)); do
    case "$1" in
        --models | --id-sets | --detectors | --data-root | --output-root | --benchmarks)
            (($# >= 2)) || die "$1 needs a value"
            case "$1" in
                --models) MODELS="$2" ;;
                --benchmarks) BENCHMARKS="$2"; benchmarks_given=1 ;;
                --id-sets) ID_SETS="$2" ;;
                --detectors) DETECTORS="$2" ;;
                --data-root) DATA_ROOT="$2" ;;
                --output-root) OUTPUT_ROOT="$2" ;;
            esac
            shift 2
            ;;
        --aggregate-only) aggregate_only=1; shift ;;
        --keep-going) keep_going=1; shift ;;
        --openood) openood=1; shift ;;
        --openood-cifar) openood_cifar=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; extra_args=("$@"); break ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done

((openood + openood_cifar < 2)) || die "--openood and --openood-cifar are two runs of run.sh"
((benchmarks_given == 0 || openood_cifar == 1)) || die "--benchmarks applies to --openood-cifar only"
read -r -a benchmarks <<<"$BENCHMARKS"
if ((openood_cifar == 1)); then
    ((${#benchmarks[@]} > 0)) || die "--benchmarks needs at least one of: ${OPENOOD_CIFAR_BENCHMARKS[*]}"
    for benchmark in "${benchmarks[@]}"; do
        [[ " ${OPENOOD_CIFAR_BENCHMARKS[*]} " == *" $benchmark "* ]] ||
            die "unknown benchmark '$benchmark' in --benchmarks; choose from: ${OPENOOD_CIFAR_BENCHMARKS[*]}"
    done
fi
if [[ -z "$OUTPUT_ROOT" ]]; then
    if ((openood == 1)); then OUTPUT_ROOT=logs/openood
    elif ((openood_cifar == 1)); then OUTPUT_ROOT=logs/openood-cifar
    else OUTPUT_ROOT=logs/paper; fi
fi
aggregate_args=(--ci)
((openood + openood_cifar == 0)) || aggregate_args+=(--openood)

read -r -a models <<<"$MODELS"
read -r -a id_sets <<<"$ID_SETS"
read -r -a detectors <<<"$DETECTORS"
# main.py resolves configs/, the feature cache and pretrained_models/ from the repository root.
DATA_ROOT="$(absolute "$DATA_ROOT")"
OUTPUT_ROOT="$(absolute "$OUTPUT_ROOT")"
cd "$(dirname "${BASH_SOURCE[0]}")"

if ((openood == 1)); then
    runs=(openood-v1.5-imagenet)  # one run per model: the experiment YAML fixes the bank, ID and OOD sets
else
    runs=("${id_sets[@]}")
fi

failed=()
# run_main LABEL ARGS...: one main.py run; a failure stops run.sh, or with --keep-going is listed at the end
run_main() {
    local label="$1" status=0
    shift
    echo "==> $label"
    "${launcher[@]}" main.py "$@" ${extra_args[@]+"${extra_args[@]}"} || status=$?
    if ((status != 0)); then
        echo "run.sh: main.py failed for ($label) with exit code $status" >&2
        ((keep_going == 1)) || exit "$status"
        failed+=("($label): exit code $status")
    fi
}

if ((aggregate_only == 0 && openood_cifar == 1)); then
    for benchmark in "${benchmarks[@]}"; do
        model=openood-resnet18-$benchmark
        folder=${benchmark}_resnet18_32x32_base_e100_lr0.1_default
        for checkpoint in "${OPENOOD_CIFAR_CHECKPOINTS[@]}"; do
            for setting in paper-settings openood-nnguide; do
                experiment=configs/experiments/openood-v1.5-$benchmark.yaml
                [[ "$setting" == paper-settings ]] || experiment=configs/experiments/openood-v1.5-$benchmark-nnguide.yaml
                run_main "$model, $checkpoint, $setting" --config "$experiment" \
                    --checkpoint "$folder/$checkpoint/best.ckpt" --data-root "$DATA_ROOT" \
                    --output-dir "$OUTPUT_ROOT/$model/$checkpoint/$setting"
            done
        done
    done
elif ((aggregate_only == 0)); then
    for model in "${models[@]}"; do
        model_detectors=("${detectors[@]}")
        model_ood_sets=("${OOD_SETS[@]}")
        # The paper's ViT-B/16 result is NNGuide with ViM as the base score (configs/detectors/nnguide-vim.yaml)
        # on ImageNet-O.
        if [[ "$model" == vit-b16-swag-e2e-v1 ]]; then
            [[ " ${detectors[*]} " == *" nnguide-vim "* ]] || model_detectors+=(nnguide-vim)
            model_ood_sets+=(imagenet-o)
        fi
        for run in "${runs[@]}"; do
            if ((openood == 1)); then
                datasets=(--config "$OPENOOD_EXPERIMENT")
            else
                datasets=(--train-data imagenet1k --id-data "$run" --ood-data "${model_ood_sets[@]}")
            fi
            run_main "$model, $run" --model "$model" "${datasets[@]}" --detectors "${model_detectors[@]}" \
                --data-root "$DATA_ROOT" --output-dir "$OUTPUT_ROOT/$model/$run"
        done
    done
fi

aggregate_status=0
"$PYTHON" -m pipeline.tools.aggregate "$OUTPUT_ROOT" ${aggregate_args[@]+"${aggregate_args[@]}"} || aggregate_status=$?
if ((${#failed[@]} > 0)); then
    echo "run.sh: ${#failed[@]} run(s) failed:" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
fi
exit "$aggregate_status"
