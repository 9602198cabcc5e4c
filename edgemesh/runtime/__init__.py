"""edgemesh.runtime"""
