"""Online RL (GRPO family, PPO): the controller wires rollout workers, rewards and trainer ranks."""
