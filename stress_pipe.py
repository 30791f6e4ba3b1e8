"""Pipelines mixing small and ~64 KiB-threshold values, MULTI blocks inside pipelines, and
concurrent clients, across rotations; every reply checked. usage: stress_pipe.py PORT SECS [--resp3]"""
import sys, os, time, threading, random, redis
port=int(sys.argv[1]); secs=float(sys.argv[2]); proto=3 if '--resp3' in sys.argv else 2
fails=[]; n_ok=[0]
def worker(wid):
    r=redis.Redis(host='127.0.0.1', port=port, protocol=proto, socket_timeout=20); rnd=random.Random(wid); t0=time.time()
    while time.time()-t0<secs:
        p=r.pipeline(transaction=rnd.random()<0.3); exp=[]
        for j in range(rnd.randint(1,400)):
            sz=rnd.choice([1,100,65535,65536,65537,200000,1<<20]) if rnd.random()<0.1 else rnd.randint(0,200)
            v=os.urandom(sz); k=f'st:{wid}:{j}'
            p.set(k,v); p.get(k); exp+=[True,v]
        try:
            res=p.execute()
            if res!=exp: fails.append((wid,'mismatch',len(res),len(exp))); print('FAIL', wid, 'mismatch', flush=True)
            else: n_ok[0]+=1
        except Exception as e: fails.append((wid,repr(e))); print('FAIL',wid,repr(e),flush=True)
ts=[threading.Thread(target=worker,args=(i,)) for i in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
print('pipelines ok', n_ok[0], 'RESULT', 'FAIL' if fails else 'PASS', fails[:5])
