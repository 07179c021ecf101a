"""The tools around a trained network: evaluate, predict, visualize, compare, summary, experiments, bench."""
