#!/usr/bin/env bash
# VIP rollout allocation in verl: the paper's setting (arXiv 2602.01601) for Qwen2.5-Math-1.5B on DAPO-Math-17k.
# Same budget as uniform GRPO with n=8 (512 prompts x 8 = 4096 rollouts per step), Dr.GRPO advantages, GP predictor.
#
#   bash examples/verl/run_vip_qwen2.5_math_1.5b_dapo.sh                     # VIP, 1 node x 8 GPUs
#   STRATEGY=uniform bash examples/verl/run_vip_qwen2.5_math_1.5b_dapo.sh    # the uniform baseline, same code path
#   ADV=rloo bash examples/verl/run_vip_qwen2.5_math_1.5b_dapo.sh            # RLOO instead of Dr.GRPO
#   NNODES=2 bash examples/verl/run_vip_qwen2.5_math_1.5b_dapo.sh           # on a running Ray cluster (README)
#   bash examples/verl/run_vip_qwen2.5_math_1.5b_dapo.sh trainer.total_epochs=1 vip.n_max=16   # any extra override
#
# Prepare data first (README): prepare_dapo_math.py writes DATA_DIR/dapo_math_17k_dedup.parquet; VAL_FILE is an
# AIME-2024 parquet in verl's format (e.g. BytedTsinghua-SIA/AIME-2024, data_source "aime*" -> math_dapo scorer).
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-Math-1.5B}
DATA_DIR=${DATA_DIR:-$HOME/data/vip}
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/dapo_math_17k_dedup.parquet}
VAL_FILE=${VAL_FILE:-$DATA_DIR/aime-2024.parquet}
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
STRATEGY=${STRATEGY:-vip}          # vip | uniform | vip_pure | inverse_acc | inverse_var | knapsack | gvm
PREDICTOR=${PREDICTOR:-gp}         # gp | beta | empirical | ridge
ADV=${ADV:-grpo}                   # grpo (run as Dr.GRPO below) | rloo
BATCH=${BATCH:-512}                # prompts per step
N=${N:-8}                          # uniform rollouts per prompt; the VIP budget is BATCH x N
MINI=${MINI:-64}                   # prompts per PPO mini-batch (rows = MINI x N; the budget stays a multiple)
MAX_PROMPT=${MAX_PROMPT:-1024}
MAX_RESPONSE=${MAX_RESPONSE:-3072} # Qwen2.5-Math-1.5B has a 4k context
PROJECT=${PROJECT:-vipalloc-verl}
NAME=${NAME:-qwen2.5-math-1.5b-dapo-${STRATEGY}-${ADV}-b${BATCH}x${N}}
CKPT_DIR=${CKPT_DIR:-$HOME/ckpt/$PROJECT/$NAME}

python3 -m vipalloc.integrations.verl_trainer \
    data.train_files="$TRAIN_FILE" \
    data.val_files="$VAL_FILE" \
    data.prompt_key=prompt \
    data.train_batch_size="$BATCH" \
    data.max_prompt_length="$MAX_PROMPT" \
    data.max_response_length="$MAX_RESPONSE" \
    data.filter_overlong_prompts=true \
    data.truncation=error \
    actor_rollout_ref.model.path="$MODEL_PATH" \
    actor_rollout_ref.model.use_remove_padding=true \
    actor_rollout_ref.model.enable_gradient_checkpointing=true \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.optim.lr_warmup_steps=10 \
    actor_rollout_ref.actor.optim.weight_decay=0.1 \
    actor_rollout_ref.actor.ppo_mini_batch_size="$MINI" \
    actor_rollout_ref.actor.use_dynamic_bsz=true \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$(( (MAX_PROMPT + MAX_RESPONSE) * 4 )) \
    actor_rollout_ref.actor.clip_ratio_low=0.2 \
    actor_rollout_ref.actor.clip_ratio_high=0.28 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.use_kl_loss=false \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.grad_clip=1.0 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n="$N" \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.top_p=1.0 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.val_kwargs.n=32 \
    actor_rollout_ref.rollout.val_kwargs.do_sample=true \
    actor_rollout_ref.rollout.val_kwargs.temperature=1.0 \
    actor_rollout_ref.rollout.val_kwargs.top_p=0.7 \
    algorithm.adv_estimator="$ADV" \
    algorithm.norm_adv_by_std_in_grpo=false \
    algorithm.use_kl_in_reward=false \
    vip.strategy="$STRATEGY" \
    vip.predictor="$PREDICTOR" \
    vip.n_min=4 \
    vip.n_max=32 \
    vip.success_key=acc \
    trainer.n_gpus_per_node="$GPUS_PER_NODE" \
    trainer.nnodes="$NNODES" \
    trainer.total_epochs=5 \
    trainer.test_freq=5 \
    trainer.save_freq=20 \
    trainer.val_before_train=true \
    trainer.logger='[console,tensorboard]' \
    trainer.project_name="$PROJECT" \
    trainer.experiment_name="$NAME" \
    trainer.default_local_dir="$CKPT_DIR" \
    "$@"
