#!/usr/bin/env bash
# The Fashion-MNIST comparisons in docs/results.md, as run (several at a time on one GPU).
#   bash docs/comparisons.sh aao|qkd|progressive|cmtkd [extra launch.py flags, e.g. --config.seed=1]
# Workdirs land in $CMP_OUT (default runs/cmp/); the results.md of each is printed at the end.
set -euo pipefail
what=${1:?aao, qkd, progressive or cmtkd}; shift || true
extra=("$@")
out=${CMP_OUT:-runs/cmp}
mkdir -p "$out"
run() {  # run NAME CONFIG FLAGS...
  local name=$1 config=$2; shift 2
  python launch.py --config "configs/$config" --workdir "$out/$name" "$@" "${extra[@]}" > "$out/$name.log" 2>&1 \
    || { echo "FAILED $name"; tail -5 "$out/$name.log"; }
}
case $what in
  aao)
    a="--config.num_epochs=10"
    run aao aao_fashion_mnist.py $a &
    run aao_no_swap aao_fashion_mnist.py $a --config.method.swap=False &
    run aao_fixed_teacher aao_fashion_mnist.py $a --config.method.teacher=fixed &
    run aao_beta05 aao_fashion_mnist.py $a --config.method.beta=0.5 &
    # dedicated models, one per bit-width, same quantizers and epochs
    run aao_qat quickstart.py $a --config.bits='(32,8,4,2)' &
    wait ;;
  qkd)
    # The full-precision teacher (wider ConvNet), trained once, then loaded by every KD run.
    run qkd_teacher quickstart.py --config.method.name=fp --config.bits='(32,)' \
        --config.model.options.widths='(32,64,128)' --config.num_epochs=10
    t="--config.method.teacher_checkpoint=$out/qkd_teacher --config.method.teacher_epochs=0 --config.num_epochs=10"
    run qkd_full qkd_fashion_mnist.py $t --config.method.phase_epochs='(2,4,4)' &
    run qkd_ss_only qkd_fashion_mnist.py $t --config.method.phase_epochs='(10,0,0)' &
    run qkd_kd_only qkd_fashion_mnist.py $t --config.method.phase_epochs='(0,0,10)' &
    wait ;;
  progressive)
    for kd in none mutual; do
      run "pg_direct_$kd" progressive_fashion_mnist.py --config.num_epochs=12 --config.method.joint_kd=$kd &
      run "pg_two_stage_$kd" progressive_fashion_mnist.py --config.num_epochs=12 --config.method.joint_kd=$kd \
          --config.method.two_stage=True &
      run "pg_progressive_$kd" progressive_fashion_mnist.py --config.num_epochs=12 --config.method.joint_kd=$kd \
          --config.method.progressive_bits='(32,8,4)' &
      run "pg_ts_pq_$kd" progressive_fashion_mnist.py --config.num_epochs=12 --config.method.joint_kd=$kd \
          --config.method.two_stage=True --config.method.progressive_bits='(8,4)' &
      run "pg_stochastic_$kd" progressive_fashion_mnist.py --config.num_epochs=12 --config.method.joint_kd=$kd \
          --config.method.stochastic_precision=True &
    done
    run pg_direct_guided progressive_fashion_mnist.py --config.num_epochs=12 --config.method.joint_kd=guided &
    wait ;;
  cmtkd)
    run cm_full cmtkd_fashion_mnist.py &
    run cm_equal_importance cmtkd_fashion_mnist.py --config.method.importance=equal &
    run cm_frozen_teachers cmtkd_fashion_mnist.py --config.method.mutual_learning=False &
    run cm_no_feature_loss cmtkd_fashion_mnist.py --config.method.feature_loss=False &
    # single-teacher KD: one 8-bit teacher, MinLogit mutual learning, no fusion loss
    run cm_single_teacher cmtkd_fashion_mnist.py --config.method.teacher_bits='(8,)' \
        --config.method.feature_loss=False &
    # plain QAT at 2 bits with the same quantizers and epochs
    run cm_qat quickstart.py --config.bits='(2,)' --config.num_epochs=10 \
        --config.quant.weight_quantizer=uniform_layer --config.quant.act_quantizer=hwgq \
        --config.quant.act_param_init='{}' &
    wait ;;
  *) echo "unknown comparison $what"; exit 2 ;;
esac
for f in "$out"/*/results.md; do [ -e "$f" ] && { echo "== $f"; cat "$f"; }; done; true
