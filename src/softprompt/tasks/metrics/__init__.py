"""tasks/metrics"""
