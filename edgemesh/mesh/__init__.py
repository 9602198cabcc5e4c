"""edgemesh.mesh"""
