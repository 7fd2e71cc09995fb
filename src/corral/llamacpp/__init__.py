"""What corral knows about llama-server's command line: the flags it owns (``flags``) and the
one place that builds a child's complete argv and environment (``command``)."""
