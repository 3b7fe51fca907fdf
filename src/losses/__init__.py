"""Losses as small functions returning unweighted named terms; weights are applied in one place."""
