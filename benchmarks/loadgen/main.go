// loadgen: the benchmark's load generator, after vmbench's echo_client.
//
// Why Go: on a 2-core machine the client shares the CPU with the server it measures; a
// compiled client with goroutines costs a fraction of the server's CPU per request, so the
// servers, not the client, set the pace (the report shows this: the same client drives
// Go's own echo server several times faster than any Python server).
//
// Modes:
//
//	echo  -conns N -size S: N connections, one request in flight on each: send S bytes,
//	      read S bytes back, repeat.  Counts and times only requests completed in the
//	      measuring window (after -warmup).
//	churn -conns N -size S: N workers each connect, echo one S-byte message, close, repeat.
//	idle  -conns N: open N connections, echo one byte on each, print "READY N", hold them
//	      until stdin closes, then close them.
//	count -conns N -size S -requests R: N connections echo for -warmup seconds as in echo
//	      mode, then pause (no request in flight), print "READY N" on stderr and wait for a
//	      line on stdin; then each connection echoes exactly R requests, timed as in echo
//	      mode, and the result is printed.  The connections stay open until stdin closes, so
//	      that closing them never falls inside a profiling window the caller opened around
//	      the R requests (benchmarks/servers/callcount.py).
//
// Output: one JSON object on stdout with raw counts and a latency histogram of 10 us buckets
// (sparse [bucket, count] pairs); rates and percentiles are computed in Python
// (benchmarks/stats.py), where they are unit-tested.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const bucketMicros = 10
const buckets = 1000000 // 10 s

var (
	histogram [buckets + 1]uint64
	requests  uint64
	failures  uint64
	phase     int32 // 0 warm-up, 1 measuring, 2 stopping
)

func record(start time.Time) {
	if atomic.LoadInt32(&phase) != 1 {
		return
	}
	b := int(time.Since(start).Microseconds() / bucketMicros)
	if b > buckets {
		b = buckets
	}
	atomic.AddUint64(&histogram[b], 1)
	atomic.AddUint64(&requests, 1)
}

func message(size int) []byte {
	msg := make([]byte, size)
	for i := range msg {
		msg[i] = 'x'
	}
	return msg
}

// echoOnce sends msg and reads len(msg) bytes back; a failure is counted.
func echoOnce(conn net.Conn, msg, reply []byte) bool {
	if _, err := conn.Write(msg); err != nil {
		atomic.AddUint64(&failures, 1)
		return false
	}
	if _, err := io.ReadFull(conn, reply); err != nil {
		atomic.AddUint64(&failures, 1)
		return false
	}
	return true
}

func echoWorker(conn net.Conn, size int, wg *sync.WaitGroup) {
	defer wg.Done()
	defer conn.Close()
	msg, reply := message(size), make([]byte, size)
	for atomic.LoadInt32(&phase) < 2 {
		start := time.Now()
		if !echoOnce(conn, msg, reply) {
			return
		}
		record(start)
	}
}

// dialAll opens n connections and echoes one byte on each, so that every connection is
// accepted and served before anything is measured.
func dialAll(addr string, n int) []net.Conn {
	conns := make([]net.Conn, 0, n)
	one := make([]byte, 1)
	for i := 0; i < n; i++ {
		conn, err := net.DialTimeout("tcp", addr, 60*time.Second)
		if err == nil {
			// A server that accepts but never answers must not hang the run.
			conn.SetDeadline(time.Now().Add(30 * time.Second))
			_, err = conn.Write(one)
		}
		if err == nil {
			_, err = io.ReadFull(conn, one)
		}
		if err != nil {
			atomic.AddUint64(&failures, 1)
			if conn != nil {
				conn.Close()
			}
			continue
		}
		conn.SetDeadline(time.Time{})
		conns = append(conns, conn)
	}
	return conns
}

func cpuSeconds(r syscall.Rusage) float64 {
	return float64(r.Utime.Sec+r.Stime.Sec) + float64(r.Utime.Usec+r.Stime.Usec)/1e6
}

func sparseHistogram() [][2]uint64 {
	sparse := [][2]uint64{}
	for b, count := range histogram {
		if count > 0 {
			sparse = append(sparse, [2]uint64{uint64(b), count})
		}
	}
	return sparse
}

// count: warm up, pause, wait for the go-ahead on stdin, then exactly per requests on each
// connection.
func count(addr string, n, size, per int, warmup float64) {
	conns := dialAll(addr, n)
	var warming int32 = 1
	var paused, done sync.WaitGroup
	start := make(chan struct{})
	for _, conn := range conns {
		paused.Add(1)
		done.Add(1)
		go func(conn net.Conn) {
			defer done.Done()
			msg, reply := message(size), make([]byte, size)
			ok := true
			for ok && atomic.LoadInt32(&warming) == 1 {
				ok = echoOnce(conn, msg, reply)
			}
			paused.Done()
			<-start
			for i := 0; ok && i < per; i++ {
				began := time.Now()
				if ok = echoOnce(conn, msg, reply); ok {
					record(began)
				}
			}
		}(conn)
	}
	time.Sleep(time.Duration(warmup * float64(time.Second)))
	atomic.StoreInt32(&warming, 0)
	paused.Wait()
	fmt.Fprintf(os.Stderr, "READY %d\n", len(conns))
	stdin := bufio.NewReader(os.Stdin)
	stdin.ReadString('\n')
	var before, after syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &before)
	started := time.Now()
	atomic.StoreInt32(&phase, 1)
	close(start)
	done.Wait()
	elapsed := time.Since(started).Seconds()
	atomic.StoreInt32(&phase, 2)
	syscall.Getrusage(syscall.RUSAGE_SELF, &after)
	json.NewEncoder(os.Stdout).Encode(map[string]interface{}{
		"mode": "count", "conns": n, "size": size, "elapsed": elapsed,
		"requests": requests, "failures": failures, "bucket_us": bucketMicros,
		"histogram": sparseHistogram(), "client_cpu_s": cpuSeconds(after) - cpuSeconds(before),
		"requests_per_conn": per, "connections": len(conns),
	})
	io.Copy(io.Discard, stdin) // hold the connections until stdin closes
	for _, conn := range conns {
		conn.Close()
	}
}

func churnWorker(addr string, size int, wg *sync.WaitGroup) {
	// Each churn cycle is one connection: connecting is part of what is measured.
	defer wg.Done()
	msg := make([]byte, size)
	reply := make([]byte, size)
	for atomic.LoadInt32(&phase) < 2 {
		start := time.Now()
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			atomic.AddUint64(&failures, 1)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		_, err = conn.Write(msg)
		if err == nil {
			_, err = io.ReadFull(conn, reply)
		}
		conn.Close()
		if err != nil {
			atomic.AddUint64(&failures, 1)
			continue
		}
		record(start)
	}
}

func idle(addr string, n int) map[string]interface{} {
	conns := make([]net.Conn, 0, n)
	one := []byte{'x'}
	for i := 0; i < n; i++ {
		conn, err := net.DialTimeout("tcp", addr, 30*time.Second)
		if err == nil {
			_, err = conn.Write(one)
		}
		if err == nil {
			conn.SetReadDeadline(time.Now().Add(30 * time.Second))
			_, err = io.ReadFull(conn, make([]byte, 1))
		}
		if err != nil {
			failures++
			continue
		}
		conns = append(conns, conn)
	}
	fmt.Fprintf(os.Stderr, "READY %d\n", len(conns))
	io.Copy(io.Discard, bufio.NewReader(os.Stdin)) // hold until stdin closes
	for _, c := range conns {
		c.Close()
	}
	return map[string]interface{}{"mode": "idle", "connections": len(conns), "failures": failures}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:25000", "server address")
	mode := flag.String("mode", "echo", "echo, churn, idle or count")
	conns := flag.Int("conns", 20, "connections (echo, idle) or workers (churn)")
	size := flag.Int("size", 1024, "message size in bytes")
	duration := flag.Float64("duration", 5, "measuring window, seconds")
	warmup := flag.Float64("warmup", 1, "warm-up before measuring, seconds")
	per := flag.Int("requests", 100, "requests per connection (count)")
	flag.Parse()

	if *mode == "idle" {
		json.NewEncoder(os.Stdout).Encode(idle(*addr, *conns))
		return
	}
	if *mode == "count" {
		count(*addr, *conns, *size, *per, *warmup)
		return
	}
	var wg sync.WaitGroup
	var open []net.Conn
	if *mode == "churn" {
		for i := 0; i < *conns; i++ {
			wg.Add(1)
			go churnWorker(*addr, *size, &wg)
		}
	} else {
		// Every connection is open and has been echoed once before the warm-up starts, so
		// the measured window is steady state, not the server's accept backlog.
		open = dialAll(*addr, *conns)
		for _, conn := range open {
			wg.Add(1)
			go echoWorker(conn, *size, &wg)
		}
	}
	time.Sleep(time.Duration(*warmup * float64(time.Second)))
	var before syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &before)
	started := time.Now()
	atomic.StoreInt32(&phase, 1)
	time.Sleep(time.Duration(*duration * float64(time.Second)))
	atomic.StoreInt32(&phase, 2)
	elapsed := time.Since(started).Seconds()
	var after syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &after)
	// A request still unanswered 10 s after the window (a server that stopped answering)
	// fails instead of hanging the run.
	for _, conn := range open {
		conn.SetDeadline(time.Now().Add(10 * time.Second))
	}
	wg.Wait()
	json.NewEncoder(os.Stdout).Encode(map[string]interface{}{
		"mode": *mode, "conns": *conns, "size": *size, "elapsed": elapsed,
		"requests": requests, "failures": failures, "bucket_us": bucketMicros,
		"histogram": sparseHistogram(), "client_cpu_s": cpuSeconds(after) - cpuSeconds(before),
	})
}
