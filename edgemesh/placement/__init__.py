"""edgemesh.placement"""
