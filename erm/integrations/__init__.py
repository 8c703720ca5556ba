"""Adapters from erm to training libraries. Each submodule imports its library lazily (or not at
all), so `import erm` never needs them.

    from erm.integrations.trl import endogenous_reward_func     # TRL reward function
"""
