"""Ray actors of rime: rollout workers, learners and the Serve embedder deployment (issues #4-#6)."""
