"""Layer 9, applications: evaluation of answers (`evaluate`: win rate against the gold, KL, lengths) and
of agents (`agent_eval`, with `commons_selfplay` for the shared fishery), and their HTML reports (`report`,
`agent_report`).
"""
