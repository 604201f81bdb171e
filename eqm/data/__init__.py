"""Clip datasets with real timestamps: video folders, probe-fps manifests, synthetic motion."""
