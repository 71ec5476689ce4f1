"""Online reinforcement learning pieces shared by the grpo and ppo stages.

- :mod:`llmlab.rl.generation`: seeded sampling with a KV cache, completion log-probs.
- :mod:`llmlab.rl.rewards`: reward sources (``from``, ``model``, ``function``, ``builtin``) and their sum.
- :mod:`llmlab.rl.value_head`: the scalar value head PPO puts on the policy.

The rollout schedule and buffer (index -> rollout, epoch, mini-batch) is the stages' own:
:mod:`llmlab.stages.online`. Nothing here imports :mod:`llmlab.stages`.
"""
