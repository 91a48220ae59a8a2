"""Ray roles that update weights: stage trainers (PhysCode, world model, alignment, GRPO learner group)
and the replay buffer with its ratio limiter. Learners never step environments."""
