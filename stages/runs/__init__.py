"""What each built-in stage kind does: `run(ctx)`, named by its declaration in stages/kinds/."""
