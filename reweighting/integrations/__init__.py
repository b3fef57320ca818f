"""Adapters to the trainers people already use. Each is imported on its own (its dependencies are optional)::

    from reweighting.integrations.hf_trainer import ReweightingTrainer
"""
