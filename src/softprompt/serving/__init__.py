"""Layer 8: `softprompt serve`, an HTTP server batching requests for many prompts on one frozen model."""
