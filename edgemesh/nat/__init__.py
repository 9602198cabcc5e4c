"""edgemesh.nat"""
